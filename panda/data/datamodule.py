"""The LightningDataModule for JSON records + a video folder (the synthetic default uses it too)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from panda.data.conversation import get_template
from panda.data.datasets import Collator, ConversationDataset, FramePipeline, QADataset
from panda.data.records import load_qa, load_records
from panda.models.stab import STABConfig

log = logging.getLogger(__name__)


def resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def frame_pipeline(cfg, with_teacher: bool = False) -> FramePipeline:
    """The one frame pipeline of a run: frames from ``cfg.frames``, geometry from ``cfg.stab``;
    ``with_teacher`` adds the teacher's copy of the frames (``cfg.teacher`` image and patch size)."""
    teacher = {}
    if with_teacher:
        teacher = {"teacher_resolution": cfg.teacher.image_size, "teacher_patch_size": cfg.teacher.patch_size}
    return FramePipeline(
        frames=cfg.frames,
        resolution=cfg.stab.resolution,
        patch_size=cfg.stab.patch_size,
        ratio=cfg.stab.ratio,
        sample_fps=cfg.data.sample_fps,
        backend=cfg.data.video_backend,
        **teacher,
    )


def make_loader(dataset, batch_size: int, num_workers: int, pad_token_id: int, sampler: Sampler | None = None) -> DataLoader:
    """The DataLoader of every panda dataset (training, held-out QA, evaluate.py): padding collator,
    failed samples reported by the collator, workers that also start inside sweep workers."""
    context = None
    if num_workers > 0 and sys.platform.startswith("linux") and multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        # inside joblib/loky sweep workers the default start method cannot start loader workers; fork can
        context = "fork"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        multiprocessing_context=context,
        num_workers=num_workers,
        collate_fn=Collator(pad_token_id),
        persistent_workers=num_workers > 0,
        drop_last=False,
    )


class ResumableSampler(Sampler[int]):
    """A seeded per-epoch shuffle, split across ranks, that can start an epoch part-way.

    Every rank draws the same permutation of epoch ``e`` (seed + e), pads it to a multiple of the
    world size by repeating its head (as ``DistributedSampler`` does) and takes every
    ``world``-th index from its rank, so ranks never share a sample within an epoch. After a
    mid-epoch resume the first ``skip`` samples of that epoch are left out, so training continues
    with exactly the batches an uninterrupted run would have seen. ``len`` stays the full epoch
    (the learning-rate schedule is computed from it).
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1, resume_from=None):
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        # asked at the first iteration: Lightning may build the loader before it restores a checkpoint
        self.resume_from = resume_from
        self.epoch = 0  # Lightning's epoch counter (set_epoch)
        self.shift = 0  # data epoch = Lightning's epoch + shift (they part when a run stopped on max_steps)
        self._resume: tuple[int, int] | None = None  # (data epoch, samples of this rank to skip)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    @property
    def data_epoch(self) -> int:
        return self.epoch + self.shift

    def resume(self, data_epoch: int, skip: int) -> None:
        """The next epoch iterated continues ``data_epoch``'s order after ``skip`` samples."""
        self._resume = (data_epoch, skip)

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self):
        skip = 0
        if self._resume is None and self.resume_from is not None:
            self._resume = self.resume_from(len(self))
        if self._resume is not None:
            self.shift = self._resume[0] - self.epoch
            skip = self._resume[1]
            self._resume = None
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.data_epoch)).tolist()
        else:
            order = list(range(self.size))
        total = len(self) * self.world
        order += order[: total - self.size]
        return iter(order[self.rank : total : self.world][skip:])


class VideoDataModule(L.LightningDataModule):
    def __init__(self, cfg, tokenizer, rejects_path: str | None = None, with_teacher: bool = False):
        super().__init__()
        self.with_teacher = with_teacher
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rejects_path = rejects_path
        self.train_set: ConversationDataset | None = None
        self.rejects: list[dict] = []
        self._resume: dict | None = None  # loader position restored from a checkpoint
        self._sampler: ResumableSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = self.cfg.data
        records = []
        for path in data.train_records:
            path = resolve(data.root, path)
            recs, rejects = load_records(path, on_error=data.on_bad_record)
            records += recs
            self.rejects += [dict(r, source=path) for r in rejects]
        if data.fraction < 1.0:  # a seeded random subset (stage 1 trains on half of Valley)
            keep = max(1, round(len(records) * data.fraction))
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(data.fraction_seed))
            records = [records[i] for i in sorted(order[:keep].tolist())]
            log.info("data.fraction=%s: training on %d records", data.fraction, len(records))
        if not records:
            raise ValueError(f"no usable training records in {list(data.train_records)} under {data.root}")
        if self.rejects and self.rejects_path:
            with open(self.rejects_path, "w") as f:
                for r in self.rejects:
                    f.write(json.dumps(r) + "\n")
            log.warning("%d malformed record(s) skipped; listed in %s", len(self.rejects), self.rejects_path)
        stab = STABConfig(**self.cfg.stab)
        self.train_set = ConversationDataset(
            records,
            resolve(data.root, data.video_root),
            self.tokenizer,
            get_template(self.cfg.model.template),
            frame_pipeline(self.cfg, self.with_teacher),
            self.cfg.model.max_length,
            stab.max_tokens_per_frame(),
        )
        log.info("training records: %d (rejected %d)", len(records), len(self.rejects))

    def _loader(self, dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return make_loader(dataset, batch_size, self.cfg.data.num_workers, self.tokenizer.pad_token_id, sampler)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableSampler(len(self.train_set), shuffle=True, seed=self.cfg.seed, rank=rank, world=world,
                                   resume_from=self._take_resume)
        self._sampler = sampler
        return self._loader(self.train_set, self.cfg.data.batch_size, sampler)

    def _take_resume(self, samples_per_epoch: int) -> tuple[int, int] | None:
        """(data epoch, samples to skip) restored from a checkpoint, handed out once."""
        if self._resume is None:
            return None
        epoch, skip = self._resume["epoch"], self._resume["batches_done"] * self.cfg.data.batch_size
        self._resume = None
        if skip >= samples_per_epoch:  # the checkpoint closed its epoch: start the next one
            epoch, skip = epoch + 1, 0
        log.info("resuming data epoch %d after %d samples per rank", epoch, skip)
        return epoch, skip

    # Lightning saves these in every checkpoint and restores them before the loaders are built
    def state_dict(self) -> dict:
        if self.trainer is None or self._sampler is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        # checkpoints are written at the end of a batch: that batch counts as done. The epoch is the
        # one the sampler is drawing (Lightning's counter has already moved on when max_steps ends a run)
        return {"epoch": self._sampler.data_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume = dict(state)

    def qa_dataloader(self) -> DataLoader:
        """Held-out open-ended QA (GPT_Zero_Shot_QA layout) for generation."""
        data = self.cfg.data
        qa_dir = resolve(data.root, data.eval_qa)
        items = load_qa(os.path.join(qa_dir, "test_q.json"), os.path.join(qa_dir, "test_a.json"))
        if data.eval_limit:
            items = items[: data.eval_limit]
        dataset = QADataset(items, os.path.join(qa_dir, "videos"), self.tokenizer, get_template(self.cfg.model.eval_template), frame_pipeline(self.cfg))
        return self._loader(dataset, data.eval_batch_size)
