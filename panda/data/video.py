"""Decode a video file and sample frames the way the release does (stab.md §0.1).

decord is the primary decoder; PyAV is the fallback (decord's bundled FFmpeg cannot decode AV1,
and some containers it refuses). Any failure of both becomes a :class:`VideoDecodeError` naming
the file, so callers catch one type.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from panda.errors import VideoDecodeError

log = logging.getLogger(__name__)


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (k, H, W, 3) uint8 RGB, k <= requested frames
    indices: list[int]  # frame indices that were decoded
    fps: float
    num_frames: int
    backend: str


def sample_frame_indices(num_frames: int, fps: float, frames: int, sample_fps: float = 1.0) -> list[int]:
    """Frame indices to decode, as the release samples them.

    Candidates are every ``round(fps / sample_fps)``-th frame. More candidates than ``frames``:
    take ``frames`` of them at ``linspace(0, n-1, frames)``. Fewer: step evenly through the whole
    video with stride ``max(1, (last - first) // (frames - 1))``; a video shorter than ``frames``
    frames yields fewer indices (the caller pads).
    """
    if num_frames <= 0:
        return []
    step = max(1, int(round(fps / sample_fps))) if fps and fps > 0 else 1
    candidates = list(range(0, num_frames, step))
    if len(candidates) >= frames:
        picks = np.linspace(0, len(candidates) - 1, frames).astype(int)
        return [candidates[i] for i in picks]
    first, last = 0, num_frames - 1
    stride = max(1, (last - first) // max(1, frames - 1))
    return list(range(first, last + 1, stride))[:frames]


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found (check data.video_root and the record's 'video' path)")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes); re-download it")


def _decode_decord(path: str, frames: int, sample_fps: float) -> DecodedVideo:
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    n = len(reader)
    fps = float(reader.get_avg_fps())
    idx = sample_frame_indices(n, fps, frames, sample_fps)
    if not idx:
        raise ValueError("video has no frames")
    data = reader.get_batch(idx).asnumpy()
    return DecodedVideo(data, idx, fps, n, "decord")


def _decode_pyav(path: str, frames: int, sample_fps: float) -> DecodedVideo:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream in file")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        n = int(stream.frames or 0)
        if n <= 0:  # container does not say: count packets (no decoding)
            n = sum(1 for p in container.demux(stream) if p.size > 0)
            container.seek(0)
        idx = sample_frame_indices(n, fps, frames, sample_fps)
        wanted = set(idx)
        out = {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= idx[-1]:
                break
    if not out:
        raise ValueError("no frame could be decoded")
    got = [i for i in idx if i in out]
    return DecodedVideo(np.stack([out[i] for i in got]), got, fps, n, "pyav")


def decode_video(path: str | os.PathLike, frames: int, sample_fps: float = 1.0, backend: str = "auto") -> DecodedVideo:
    """Decode the sampled frames of ``path``.

    ``backend``: ``auto`` (decord, then PyAV on any failure), ``decord`` or ``pyav``.
    Raises :class:`VideoDecodeError` naming the file when nothing works.
    """
    path = os.fspath(path)
    _check_file(path)
    order = {"auto": ("decord", "pyav"), "decord": ("decord",), "pyav": ("pyav",)}.get(backend)
    if order is None:
        raise ValueError(f"unknown video backend {backend!r}; use auto, decord or pyav")
    errors = []
    for name in order:
        try:
            fn = _decode_decord if name == "decord" else _decode_pyav
            return fn(path, frames, sample_fps)
        except Exception as exc:  # decord raises DECORDError (not a RuntimeError); catch at the boundary
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            log.debug("decoder %s failed on %s: %s", name, path, exc)
    raise VideoDecodeError(path, "; ".join(errors))
