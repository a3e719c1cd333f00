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
from panda.data.records import load_records
from panda.data.sampling import EpochBatchSampler, Positioned, SourceSpec
from panda.data.shards import ShardDataset, ShardSource

log = logging.getLogger(__name__)


def resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


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
    """Training data from JSON records + a video folder (``data.train_records``, the synthetic
    default) or from prepared litdata shards (``data.shards``: one source or a weighted mixture),
    batched by :class:`EpochBatchSampler` in both cases.

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
        self.train_set: ConversationDataset | ShardDataset | None = None
        self.sources: list[SourceSpec] = []
        self.rejects: list[dict] = []
        self.position: tuple[int, int] | None = None  # (data epoch, batch position) of the batch being trained
        self._resume: dict | None = None  # loader position restored from a checkpoint
        self._restored: dict | None = None
        self._sampler: EpochBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        common = dict(tokenizer=self.tokenizer, template=self.template, pipeline=self.pipeline,
                      max_length=self.max_length, visual_tokens_per_frame=self.visual_tokens_per_frame)
        if self.data.shards:
            self._setup_shards(common)
        else:
            self._setup_records(common)

    def _setup_shards(self, common: dict) -> None:
        data = self.data
        sources = [ShardSource.open(s.name, s.path, s.weight, data.cache_dir) for s in data.shards]
        # length grouping sorts by text + visual tokens where the index has each video's size
        full = [s.llm_lengths(self.pipeline.sampling, self.pipeline.frames) for s in sources]
        self.sources = [SourceSpec(s.name, s.num_records, s.record_chunks(), n or s.lengths, s.weight)
                        for s, n in zip(sources, full)]
        if self.data.group_by_length and any(n is None for n in full):
            log.info("length grouping by text only: %s has no video sizes in its index (prepared by an older panda; "
                     "prepare it again to group by text + visual tokens)",
                     ", ".join(s.name for s, n in zip(sources, full) if n is None))
        self.train_set = ShardDataset(sources, **common)
        for s in sources:
            log.info("shards %s: %d records on %d videos in %d chunks at %s%s", s.name, s.num_records, s.num_entries,
                     len(s.chunk_sizes), s.path,
                     f" (weight {s.weight})" if s.weight is not None else "")

    def _setup_records(self, common: dict) -> None:
        data = self.data
        records, self.rejects = load_records([resolve(data.root, p) for p in data.train_records], data.on_bad_record)
        if not records:
            raise ValueError(f"no usable training records in {list(data.train_records)} under {data.root}")
        if self.rejects and self.rejects_path:  # load_records has logged the count and the first
            with open(self.rejects_path, "w") as f:
                for r in self.rejects:
                    f.write(json.dumps(r) + "\n")
            log.warning("malformed records listed in %s", self.rejects_path)
        lengths = [sum(len(q) + len(a) for q, a in rec.turns) for rec in records]  # characters
        # one sample per "chunk": local files are read at random, so the shuffle is a full one
        self.sources = [SourceSpec("records", len(records), list(range(len(records))), lengths)]
        self.train_set = ConversationDataset(records, resolve(data.root, data.video_root), **common)
        log.info("training records: %d (rejected %d)", len(records), len(self.rejects))

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
