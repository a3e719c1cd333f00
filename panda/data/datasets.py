"""Map-style datasets: a record or a QA item -> decoded, preprocessed, tokenised sample.

A sample that cannot be made (unreadable video, over-long conversation, nothing supervised) is
returned as ``{"error": {...}}`` naming the record and file; :class:`Collator` drops it from the
batch and reports it under ``batch["skipped"]``, so training counts and logs it. Nothing is ever
replaced by another sample.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from panda.data.budget import SamplingRule
from panda.data.conversation import (
    IGNORE_INDEX,
    ConversationTemplate,
    tokenize_conversation,
    tokenize_prompt,
)
from panda.data.frames import patch_validity, preprocess_frames
from panda.data.records import QAItem, VideoRecord
from panda.data.video import decode_video
from panda.errors import SampleError, VideoDecodeError

# preferred when a benchmark names a video without its extension and several files share the stem;
# any other existing file is tried too (the decoders decide what they can open)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".mpg", ".mpeg", ".m4v", ".wmv", ".flv", ".3gp",
                    ".ts", ".ogv")


@dataclass(frozen=True)
class FramePipeline:
    """Decode -> sample -> resize/pad/mask/normalise, with one set of settings."""

    frames: int
    resolution: int
    patch_size: int
    ratio: int = 2
    sample_fps: float = 1.0
    backend: str = "auto"
    teacher_resolution: int | None = None  # set when a distillation teacher needs its own copy of the frames
    teacher_patch_size: int = 14
    # data.sampling fps / budget: each video's frame count from its length or size (panda.data.budget);
    # None or mode release: ``frames`` per video
    sampling: SamplingRule | None = None

    @property
    def varies(self) -> bool:
        """Whether videos get different frame counts (then ``frames`` is not the count)."""
        return self.sampling is not None and self.sampling.mode != "release"

    def __call__(self, source, name: str | None = None, backend: str | None = None) -> dict[str, torch.Tensor]:
        """``source``: a video file, or a video's encoded bytes (a shard entry; ``name`` says which).
        ``backend``: the decoder prepare found to work (``pyav`` skips a decord attempt that fails).

        Returns ``pixels`` (F, 3, R, R), ``frame_mask`` (F, R, R); with a teacher also ``teacher_pixels``
        and ``teacher_mask`` at the teacher's resolution (ratio 1: docs/model-reference.md, "The teacher's copy")."""
        use = "pyav" if self.backend == "auto" and backend == "pyav" else self.backend
        picker = self.sampling.pick if self.varies else None
        decoded = decode_video(source, self.frames, self.sample_fps, use, name=name, picker=picker)
        count = self.sampling.padded_count(len(decoded.frames)) if self.varies else self.frames
        pixels, mask = preprocess_frames(decoded.frames, count, self.resolution, self.patch_size, self.ratio)
        out = {"pixels": pixels, "frame_mask": mask}
        if self.teacher_resolution:
            out["teacher_pixels"], out["teacher_mask"] = preprocess_frames(
                decoded.frames, count, self.teacher_resolution, self.teacher_patch_size, 1)
        return out


class ConversationDataset(Dataset):
    """Training samples from Valley / Video-ChatGPT records."""

    def __init__(self, records: list[VideoRecord], video_root: str, tokenizer, template: ConversationTemplate,
                 pipeline: FramePipeline, max_length: int, visual_tokens_per_frame: int):
        self.records = records
        self.video_root = video_root
        self.tokenizer = tokenizer
        self.template = template
        self.pipeline = pipeline
        self.max_length = max_length
        self.visual_tokens_per_frame = visual_tokens_per_frame

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        path = os.path.join(self.video_root, rec.video)
        try:
            frames = self.pipeline(path)  # first: under data.sampling fps / budget the frame count comes from the video
            tok = tokenize_conversation(
                self.tokenizer, self.template, rec.turns, sample_frames(self.pipeline, frames),
                self.max_length, self.visual_tokens_per_frame, rec.id, path,
            )
        except (VideoDecodeError, SampleError) as exc:  # counted and logged by the training loop
            return {"error": {"id": rec.id, "path": path, "reason": exc.reason, "code": exc.code}}
        return {"id": rec.id, "input_ids": tok.input_ids, "labels": tok.labels, **frames}


@functools.lru_cache(maxsize=32)
def _files_by_stem(video_dir: str, _mtime_ns: int) -> dict[str, str]:
    """stem -> file name for every file of ``video_dir``, known video extensions first (one listing
    per folder and modification time)."""
    def rank(name: str) -> tuple:
        ext = os.path.splitext(name)[1].lower()
        return (VIDEO_EXTENSIONS.index(ext) if ext in VIDEO_EXTENSIONS else len(VIDEO_EXTENSIONS), name)

    index: dict[str, str] = {}
    for name in sorted(os.listdir(video_dir), key=rank):
        index.setdefault(os.path.splitext(name)[0], name)
    return index


def find_video(video_dir: str, name: str) -> str | None:
    """Resolve a QA ``video_name`` to a file: the exact name (any extension), else a file with that
    stem (known video extensions preferred), each also with the ActivityNet ``v_`` prefix."""
    stems = (name, f"v_{name}")
    for stem in stems:
        if os.path.isfile(os.path.join(video_dir, stem)):
            return os.path.join(video_dir, stem)
    if not os.path.isdir(video_dir):
        return None
    index = _files_by_stem(video_dir, os.stat(video_dir).st_mtime_ns)
    for stem in stems:
        if stem in index:
            return os.path.join(video_dir, index[stem])
    return None


class QADataset(Dataset):
    """Generation prompts for open-ended VideoQA items (one question per sample)."""

    def __init__(self, items: list[QAItem], video_dir: str, tokenizer, template: ConversationTemplate, pipeline: FramePipeline):
        self.items = items
        self.video_dir = video_dir
        self.tokenizer = tokenizer
        self.template = template
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        path = find_video(self.video_dir, item.video)
        if path is None:
            return {"error": {"id": item.question_id, "path": os.path.join(self.video_dir, item.video), "reason": "video file not found"}}
        try:
            frames = self.pipeline(path)
        except VideoDecodeError as exc:
            return {"error": {"id": item.question_id, "path": path, "reason": exc.reason}}
        ids = tokenize_prompt(self.tokenizer, self.template, item.question, sample_frames(self.pipeline, frames))
        return {"id": item.question_id, "input_ids": ids, "labels": None, **frames}


def sample_frames(pipeline: FramePipeline, frames: dict) -> int:
    """A sample's frame count (its frame placeholders in the text): the decoded sample's under
    ``data.sampling`` fps / budget, else ``frames``."""
    return int(frames["pixels"].shape[0]) if pipeline.varies else pipeline.frames


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack (F_i, ...) tensors into (B, max F, ...), zero-filled after each one's own frames."""
    frames = max(t.shape[0] for t in tensors)
    if all(t.shape[0] == frames for t in tensors):
        return torch.stack(tensors)
    out = tensors[0].new_zeros((len(tensors), frames, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


@dataclass
class Collator:
    """Right-pads token sequences, stacks frames, and moves failed samples to ``skipped``. With
    ``unk_token_id`` it also reports ``unk_fraction``: the share of the text tokens (frame
    placeholders and padding excluded) the tokenizer could only map to its unknown token. Samples of
    a training mixture (panda/data/mixture.py) give ``sources``: each kept sample's source name."""

    pad_token_id: int = 0
    unk_token_id: int | None = None
    # STAB's patch side: with it the batch also carries ``host``, the host copies the model plans the
    # splice of visual tokens with (ids, mask, labels, frame counts, patch validity), so a training
    # step reads nothing back from the device (panda/training/syncs.py)
    patch_size: int | None = None
    teacher_patch_size: int | None = None  # the distillation teacher's: ``host["teacher_valid"]`` too

    def __call__(self, samples: list[dict]) -> dict:
        skipped = [s["error"] for s in samples if "error" in s]
        good = [s for s in samples if "error" not in s]
        batch: dict = {"skipped": skipped, "ids": [s["id"] for s in good]}
        if samples and "position" in samples[0]:  # (data epoch, batch position) from EpochBatchSampler
            batch["position"] = samples[0]["position"]
        if samples and "source" in samples[0]:  # the mixture source of each sample (its error carries its own)
            batch["sources"] = [s["source"] for s in good]
        if not good:
            return batch
        length = max(len(s["input_ids"]) for s in good)
        n = len(good)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        has_labels = good[0]["labels"] is not None
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for i, s in enumerate(good):
            k = len(s["input_ids"])
            input_ids[i, :k] = s["input_ids"]
            attention_mask[i, :k] = 1
            if has_labels:
                labels[i, :k] = s["labels"]
        batch.update(input_ids=input_ids, attention_mask=attention_mask)
        batch["padded_fraction"] = 1.0 - float(attention_mask.sum()) / attention_mask.numel()  # text tokens only
        if self.unk_token_id is not None:
            text = attention_mask.bool() & (input_ids >= 0)
            batch["unk_fraction"] = float(((input_ids == self.unk_token_id) & text).sum()) / max(1, int(text.sum()))
        counts = [int(s["pixels"].shape[0]) for s in good if "pixels" in s]
        if counts and len(set(counts)) > 1:
            # videos with different frame counts (data.sampling fps / budget): pad to the largest with
            # absent frames; frame_counts says how many are real, and the model gives absent ones no tokens
            batch["frame_counts"] = torch.tensor(counts)
        for key in ("pixels", "frame_mask", "teacher_pixels", "teacher_mask"):
            if key in good[0]:
                batch[key] = _stack_padded([s[key] for s in good])
        if has_labels:
            batch["labels"] = labels
        if self.patch_size and "frame_mask" in batch:
            # numpy arrays: Lightning moves a batch's tensors to the device and leaves these on the host.
            # Copies, not views: a loader worker moves the tensors' storage into shared memory to send
            # the batch, which frees the memory a view would still point at
            batch["host"] = {"input_ids": input_ids.numpy().copy(), "attention_mask": attention_mask.numpy().copy(),
                             "labels": labels.numpy().copy() if has_labels else None,
                             "frame_counts": counts if len(set(counts)) > 1 else None,
                             "patch_valid": patch_validity(batch["frame_mask"], self.patch_size)}
            if self.teacher_patch_size and "teacher_mask" in batch:
                batch["host"]["teacher_valid"] = patch_validity(batch["teacher_mask"], self.teacher_patch_size)
        return batch
