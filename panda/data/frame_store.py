"""Frames stored once (``python -m panda.data.prepare --store frames``).

The release samples frames deterministically (1 fps candidates, ``linspace`` picks:
docs/model-reference.md, "Frame sampling"), so the frames a sample trains on never change between
epochs. A frame store keeps them already sampled and resized to the region they fill on the canvas
(``resize_frames``: uint8, the same pixels the decode path computes), one image per frame, plus
the teacher's copy at its own resolution when distillation needs it. Training then reads a few
small images instead of decoding the video; the price is that the store is tied to ``frames``,
``sample_fps`` and the STAB geometry (``resolution``, ``patch_size``, ``ratio``): another setting
needs a re-prepare, and :func:`check_frame_store` says so before training starts.

Formats: ``png`` (lossless: the stored pixels equal the decoded ones exactly) or ``jpeg`` at a
stated quality (smaller; ``benchmarks/data_pipeline.py`` prints the pixel difference per quality).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from panda.data.frames import FrameGeometry, place_frames, resize_frames
from panda.errors import PandaError

FRAME_FORMATS = ("jpeg", "png")


class FrameStoreMismatch(PandaError):
    """A frame store was prepared for other frame settings than the run asks for."""


@dataclass(frozen=True)
class FrameStoreSpec:
    """What a frame store holds: the settings that fixed its pixels, and how they are encoded."""

    frames: int
    sample_fps: float
    resolution: int
    patch_size: int
    ratio: int
    format: str = "png"
    quality: int = 95  # JPEG only
    teacher_resolution: Optional[int] = None  # also store the teacher's copy (ratio 1) at this size
    teacher_patch_size: int = 14

    def __post_init__(self):
        if self.format not in FRAME_FORMATS:
            raise ValueError(f"frame format {self.format!r}: use one of {', '.join(FRAME_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality {self.quality}: use 1..100")

    def to_dict(self) -> dict:
        return asdict(self)


def encode_images(resized: torch.Tensor, fmt: str, quality: int = 95) -> list[bytes]:
    """(k, 3, h, w) uint8 -> one encoded image per frame."""
    from PIL import Image

    out = []
    for frame in resized.permute(0, 2, 3, 1).contiguous().numpy():  # (k, 3, h, w) -> (k, h, w, 3)
        buf = io.BytesIO()
        if fmt == "jpeg":
            # 4:4:4 chroma: the frames are already at training size, chroma subsampling would halve colour detail
            Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=0)
        else:
            Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def decode_images(blob: bytes | memoryview, sizes: list[int]) -> torch.Tensor:
    """The concatenated images of one entry -> (k, 3, h, w) uint8."""
    from PIL import Image

    view, frames, start = memoryview(blob), [], 0
    for n in sizes:
        with Image.open(io.BytesIO(view[start:start + n])) as img:
            frames.append(np.asarray(img.convert("RGB")))
        start += n
    if start != len(view):
        raise ValueError(f"frame store entry holds {len(view)} bytes, its sizes add up to {start}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (k, h, w, 3) -> (k, 3, h, w)


def _copies(spec: FrameStoreSpec) -> list[tuple[str, str, str, int, int, int]]:
    """(name, pixels key, mask key, resolution, patch size, ratio) of each stored copy, in entry order."""
    copies = [("student", "pixels", "frame_mask", spec.resolution, spec.patch_size, spec.ratio)]
    if spec.teacher_resolution:
        copies.append(("teacher", "teacher_pixels", "teacher_mask", spec.teacher_resolution, spec.teacher_patch_size, 1))
    return copies


def store_frames(decoded_frames: np.ndarray, spec: FrameStoreSpec) -> tuple[bytes, dict]:
    """A decoded video's sampled frames (k, H, W, 3) uint8 -> (the entry's bytes, its metadata)."""
    parts, meta = [], {}
    for name, _, _, resolution, patch, ratio in _copies(spec):
        resized, geo = resize_frames(decoded_frames, spec.frames, resolution, patch, ratio)
        images = encode_images(resized, spec.format, spec.quality)
        parts += images
        meta[name] = {"sizes": [len(b) for b in images], "geometry": [geo.out_h, geo.out_w, geo.top, geo.left]}
    return b"".join(parts), meta


def read_frames(blob: bytes | memoryview, meta: dict, spec: FrameStoreSpec, with_teacher: bool) -> dict[str, torch.Tensor]:
    """An entry of a frame store -> what :class:`~panda.data.datasets.FramePipeline` returns for the video."""
    view, out, start = memoryview(blob), {}, 0
    for name, pixels_key, mask_key, resolution, _, _ in _copies(spec):
        sizes = meta[name]["sizes"]
        n = sum(sizes)
        if name == "student" or with_teacher:
            resized = decode_images(view[start:start + n], sizes)
            out[pixels_key], out[mask_key] = place_frames(resized, FrameGeometry(*meta[name]["geometry"]), spec.frames, resolution)
        start += n
    return out


def check_frame_store(path: str, stored: dict, pipeline) -> FrameStoreSpec:
    """The spec of the frame store at ``path`` if it gives ``pipeline`` (a FramePipeline) exactly the
    pixels decoding would; else a :class:`FrameStoreMismatch` naming each setting and the fix."""
    spec = FrameStoreSpec(**stored)
    if pipeline.varies:
        raise FrameStoreMismatch(
            f"{path} stores {spec.frames} frames per video, sampled the release's way; data.sampling="
            f"{pipeline.sampling.mode} picks each video's frames from its length or size: train on --store video "
            "shards (the default) with it, or set data.sampling=release")
    wanted = {"frames": pipeline.frames, "sample_fps": pipeline.sample_fps, "resolution": pipeline.resolution,
              "patch_size": pipeline.patch_size, "ratio": pipeline.ratio}
    if pipeline.teacher_resolution:
        wanted["teacher_resolution"] = pipeline.teacher_resolution
        wanted["teacher_patch_size"] = pipeline.teacher_patch_size
    differ = [f"{k}: stored {getattr(spec, k)}, the run asks {v}" for k, v in wanted.items() if getattr(spec, k) != v]
    if differ:
        flags = (f"--frames {pipeline.frames} --sample-fps {pipeline.sample_fps} --resolution {pipeline.resolution} "
                 f"--patch-size {pipeline.patch_size} --ratio {pipeline.ratio}"
                 + (f" --teacher-resolution {pipeline.teacher_resolution}" if pipeline.teacher_resolution else ""))
        raise FrameStoreMismatch(
            f"{path} stores frames sampled and resized for other settings ({'; '.join(differ)}). A frame store "
            f"is tied to them: prepare again with `--store frames {flags}`, or with `--store video` (the default), "
            "whose shards serve any frame setting")
    return spec
