"""The LightningDataModule: JSON records + a video folder (the synthetic default), or prepared shards."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys

import lightning as L
from torch.utils.data import DataLoader, Sampler

from panda.data.conversation import ConversationTemplate
from panda.data.datasets import Collator, ConversationDataset, FramePipeline
from panda.data.mixture import MixtureDataset, MixtureSource, check_source_paths, mixture_sources, source_pipeline
from panda.data.records import load_records
from panda.data.sampling import EpochBatchSampler, Positioned, SourceSpec
from panda.data.shards import ShardDataset, ShardFormatError, ShardSource
from panda.errors import ConfigError

log = logging.getLogger(__name__)


def auto_workers() -> int:
    """Loader workers per process from the machine: the cores this process gets (cores / processes
    on the node) minus one for the training loop, at most 8 (decoding scales no further)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, processes) - 1))


def make_loader(dataset, batch_size: int, num_workers: int | None, pad_token_id: int, batch_sampler: Sampler | None = None,
                unk_token_id: int | None = None, patch_size: int | None = None,
                teacher_patch_size: int | None = None) -> DataLoader:
    """The DataLoader of every panda dataset (training, held-out QA, evaluate.py): padding collator,
    failed samples reported by the collator, workers that also start inside sweep workers.
    With a ``batch_sampler`` (training) the batches are its; otherwise ``batch_size`` in order.
    ``num_workers=None`` picks :func:`auto_workers`. ``patch_size`` (STAB's) and ``teacher_patch_size``
    (a distillation teacher's): for the host copies a batch carries (:class:`Collator`)."""
    num_workers = auto_workers() if num_workers is None else num_workers
    context = None
    if num_workers > 0 and sys.platform.startswith("linux") and multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        # inside joblib/loky sweep workers the default start method cannot start loader workers; fork can
        context = "fork"
    sizing = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size, "drop_last": False}
    return DataLoader(
        dataset,
        **sizing,
        multiprocessing_context=context,
        num_workers=num_workers,
        collate_fn=Collator(pad_token_id, unk_token_id, patch_size, teacher_patch_size),
        persistent_workers=num_workers > 0,
    )


class VideoDataModule(L.LightningDataModule):
    """Training data from a mixture of sources (panda/data/mixture.py): ``data.sources`` (prepared
    shard folders and records files, each with its weight, cap and frame sampling), ``data.shards``
    (shard folders) or ``data.train_records`` + a video folder (the synthetic default), batched by
    :class:`EpochBatchSampler` in every case.

    ``data`` is the run's ``DataConfig``; ``pipeline`` decodes and preprocesses frames (with the
    teacher's copy when distilling); ``visual_tokens_per_frame`` is STAB's largest token count per
    frame (lengths for the ``max_length`` check). The position of the batch being trained is read
    from the batch itself (``on_before_batch_transfer``) and saved in every checkpoint."""

    def __init__(self, data, tokenizer, pipeline: FramePipeline, template: ConversationTemplate, max_length: int,
                 visual_tokens_per_frame: int, seed: int, rejects_path: str | None = None):
        super().__init__()
        self.data = data
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.template = template
        self.max_length = max_length
        self.visual_tokens_per_frame = visual_tokens_per_frame
        self.seed = seed
        self.rejects_path = rejects_path
        self.train_set: MixtureDataset | None = None
        self.mixture: list[MixtureSource] = []  # the sources as configured (panda/data/mixture.py)
        self.sources: list[SourceSpec] = []  # ... and as the sampler sees them
        self.rejects: list[dict] = []
        self.rejected_by_source: dict[str, int] = {}  # records source -> malformed records left out
        self.position: tuple[int, int] | None = None  # (data epoch, batch position) of the batch being trained
        self._resume: dict | None = None  # loader position restored from a checkpoint
        self._restored: dict | None = None
        self._sampler: EpochBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        common = dict(tokenizer=self.tokenizer, template=self.template,
                      max_length=self.max_length, visual_tokens_per_frame=self.visual_tokens_per_frame)
        self.mixture = mixture_sources(self.data)
        check_source_paths(self.mixture)
        datasets, self.sources, self.rejects = [], [], []
        for src in self.mixture:
            pipeline = source_pipeline(self.pipeline, src)
            dataset, spec = (self._open_shards if src.kind == "shards" else self._open_records)(src, pipeline, common)
            datasets.append(dataset)
            self.sources.append(spec)
        if self.rejects and self.rejects_path:  # load_records has logged the count and the first
            with open(self.rejects_path, "w") as f:
                for r in self.rejects:
                    f.write(json.dumps(r) + "\n")
            log.warning("malformed records listed in %s", self.rejects_path)
        self.train_set = MixtureDataset(datasets, [s.name for s in self.mixture])

    def _open_shards(self, src: MixtureSource, pipeline: FramePipeline, common: dict) -> tuple[ShardDataset, SourceSpec]:
        try:
            s = ShardSource.open(src.name, src.path, src.weight, self.data.cache_dir)
        except ShardFormatError as exc:
            if src.key.startswith("data.shards"):
                raise
            raise ConfigError(f"{src.key}.path={src.path} ({src.name}): {exc}. A records file is a source too: "
                              f"its path (.json) and video_root") from None
        if not s.num_records:
            raise ConfigError(f"{src.key} ({src.name}): {s.path} holds no records (prepare left every record out: its "
                              "rejects.jsonl says why); prepare it again or leave the source out")
        # length grouping sorts by text + visual tokens where the index has each video's size
        full = s.llm_lengths(pipeline.sampling, pipeline.frames)
        if self.data.group_by_length and full is None:
            log.info("length grouping by text only: %s has no video sizes in its index (prepared by an older panda; "
                     "prepare it again to group by text + visual tokens)", s.name)
        log.info("shards %s: %d records on %d videos in %d chunks at %s%s", s.name, s.num_records, s.num_entries,
                 len(s.chunk_sizes), s.path, f" (weight {s.weight})" if s.weight is not None else "")
        spec = SourceSpec(s.name, s.num_records, s.record_chunks(), full or s.lengths, s.weight, src.cap)
        return ShardDataset([s], pipeline=pipeline, **common), spec

    def _open_records(self, src: MixtureSource, pipeline: FramePipeline, common: dict) -> tuple[ConversationDataset, SourceSpec]:
        records, rejects = load_records(list(src.paths), self.data.on_bad_record)
        self.rejects += rejects
        self.rejected_by_source[src.name] = len(rejects)
        if not records:
            what = list(self.data.train_records) if src.key == "data.train_records" else src.path
            raise ConfigError(f"{src.key}: no usable training records in {what} under {self.data.root}"
                              + (f" ({len(rejects)} malformed, listed in {self.rejects_path})" if rejects else ""))
        lengths = [sum(len(q) + len(a) for q, a in rec.turns) for rec in records]  # characters
        log.info("training records%s: %d (rejected %d)", "" if src.name == "records" else f" {src.name}", len(records),
                 len(rejects))
        # one sample per "chunk": local files are read at random, so the shuffle is a full one
        spec = SourceSpec(src.name, len(records), list(range(len(records))), lengths, src.weight, src.cap)
        return ConversationDataset(records, src.video_root, pipeline=pipeline, **common), spec

    def batch_sampler(self, rank: int = 0, world: int = 1) -> EpochBatchSampler:
        """The epoch plan of one rank: seeded, chunk-aware, length-grouped, weighted, resumable."""
        data = self.data
        return EpochBatchSampler(
            self.sources, data.batch_size, seed=self.seed, rank=rank, world=world,
            samples_per_epoch=data.samples_per_epoch, shuffle_window=data.shuffle_window,
            group_by_length=data.group_by_length, group_batches=data.group_batches,
            fraction=data.fraction, fraction_seed=data.fraction_seed, resume_from=self._take_resume)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        data = self.data
        sampler = self.batch_sampler(rank, world)
        if data.fraction < 1.0:
            log.info("data.fraction=%s: training on %d of %d samples", data.fraction,
                     sum(len(m) for m in sampler.members), sum(s.size for s in self.sources))
        self._sampler = sampler
        return make_loader(Positioned(self.train_set), data.batch_size, data.num_workers, self.tokenizer.pad_token_id, sampler,
                           unk_token_id=self.tokenizer.unk_token_id, patch_size=self.pipeline.patch_size,
                           teacher_patch_size=self.pipeline.teacher_patch_size if self.pipeline.teacher_resolution else None)

    def _take_resume(self, batches_per_epoch: int) -> tuple[int, int] | None:
        """(data epoch, batches of this rank to skip) restored from a checkpoint, handed out once."""
        if self._resume is None:
            return None
        epoch, skip = self._resume["epoch"], self._resume["batches_done"]
        self._resume = None
        if skip >= batches_per_epoch:  # the checkpoint closed its epoch: start the next one
            epoch, skip = epoch + 1, 0
        log.info("resuming data epoch %d after %d batches per rank", epoch, skip)
        return epoch, skip

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning calls this with each batch just before it is trained on: remember its position."""
        if isinstance(batch, dict) and "position" in batch:
            self.position = batch["position"]
        return batch

    # Lightning saves these in every checkpoint and restores them before the loaders are built
    def state_dict(self) -> dict:
        if self.position is None:
            return {}
        # checkpoints are written at the end of a batch: that batch counts as done
        return {"epoch": int(self.position[0]), "batches_done": int(self.position[1]) + 1}

    def load_state_dict(self, state: dict) -> None:
        if state and state != self._restored:  # Lightning restores it again after preload_position did
            self._resume, self._restored = dict(state), dict(state)

    def preload_position(self, checkpoint: dict) -> None:
        """Take the loader position from a checkpoint's contents before ``Trainer.fit`` starts.

        ModelParallelStrategy (FSDP) starts the train loader's iterator before it restores the
        checkpoint, and a multi-worker loader prefetches from its sampler at once, so Lightning's
        own restore would come too late."""
        state = checkpoint.get(type(self).__qualname__)
        if state:
            self.load_state_dict(state)
