"""The LightningDataModule for JSON records + a video folder (the synthetic default uses it too)."""

from __future__ import annotations

import json
import logging
import os

import lightning as L
import torch
from torch.utils.data import DataLoader

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


class VideoDataModule(L.LightningDataModule):
    def __init__(self, cfg, tokenizer, rejects_path: str | None = None, with_teacher: bool = False):
        super().__init__()
        self.with_teacher = with_teacher
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rejects_path = rejects_path
        self.train_set: ConversationDataset | None = None
        self.rejects: list[dict] = []

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

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=Collator(self.tokenizer.pad_token_id),
            persistent_workers=workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.cfg.data.batch_size, shuffle=True)

    def qa_dataloader(self) -> DataLoader:
        """Held-out open-ended QA (GPT_Zero_Shot_QA layout) for generation."""
        data = self.cfg.data
        qa_dir = resolve(data.root, data.eval_qa)
        items = load_qa(os.path.join(qa_dir, "test_q.json"), os.path.join(qa_dir, "test_a.json"))
        if data.eval_limit:
            items = items[: data.eval_limit]
        dataset = QADataset(items, os.path.join(qa_dir, "videos"), self.tokenizer, get_template(self.cfg.model.eval_template), frame_pipeline(self.cfg))
        return self._loader(dataset, data.eval_batch_size, shuffle=False)
