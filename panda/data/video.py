"""Decode a video file and sample frames the way the release does
(docs/model-reference.md, "Frame sampling").

decord is the primary decoder; PyAV is the fallback (decord's bundled FFmpeg cannot decode AV1,
and some containers it refuses). TorchCodec (``backend="torchcodec"``, an optional extra that
uses the system's FFmpeg libraries) is the maintained alternative. Any failure becomes a
:class:`VideoDecodeError` naming the file, so callers catch one type.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from panda.choices import Choice
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


# a file path, or the encoded bytes of a video (a shard entry)
VideoSource = Union[str, os.PathLike, bytes, memoryview]

# how many frames, and which: (frame count, fps, a function giving (height, width)) -> indices.
# None = the release's rule for a fixed count (``sample_frame_indices``); panda.data.budget has the others
FramePicker = Callable[[int, float, Callable[[], tuple[int, int]]], list[int]]


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found (check data.video_root and the record's 'video' path)", code="missing")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes); re-download it", code="empty_file")


def _open(source):
    """What decord and PyAV open: the path itself, or a fresh in-memory file over the bytes."""
    return io.BytesIO(source) if isinstance(source, (bytes, memoryview)) else source


_DECORD_QUIET = False


@contextlib.contextmanager
def _native_stderr_captured():
    """Sends what native code writes to file descriptor 2 (decord's C++ ``ERROR opening ...`` lines)
    into a buffer instead of the terminal; yields a function that returns what was written. The
    failure itself still raises, and the caller puts the reason in its error message."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr descriptor: nothing to keep quiet
        yield lambda: ""
        return
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield lambda: (buffer.seek(0), buffer.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _pick(n: int, fps: float, size, frames: int, sample_fps: float, picker: Optional[FramePicker]) -> list[int]:
    return sample_frame_indices(n, fps, frames, sample_fps) if picker is None else picker(n, fps, size)


def _decode_decord(source, frames: int, sample_fps: float, threads: int = 1, picker: Optional[FramePicker] = None) -> DecodedVideo:
    import decord

    global _DECORD_QUIET
    if not _DECORD_QUIET:  # FFmpeg's own messages ("[h264 @ 0x...] ...") stay off the terminal; errors raise
        decord.logging.set_level(decord.logging.QUIET)
        _DECORD_QUIET = True
    with _native_stderr_captured() as native:
        try:
            reader = decord.VideoReader(_open(source), num_threads=threads)
        except Exception as exc:
            said = [line.split(": ", 1)[-1] for line in native().strip().splitlines() if line.strip()]
            raise RuntimeError(said[-1] if said else str(exc)) from exc
    n = len(reader)
    fps = float(reader.get_avg_fps())
    idx = _pick(n, fps, lambda: tuple(reader[0].shape[:2]), frames, sample_fps, picker)
    if not idx:
        raise ValueError("video has no frames")
    data = reader.get_batch(idx).asnumpy()
    return DecodedVideo(data, idx, fps, n, "decord")


def _decode_pyav(source, frames: int, sample_fps: float, threads: int = 1, picker: Optional[FramePicker] = None) -> DecodedVideo:
    import av

    with av.open(_open(source)) as container:
        if not container.streams.video:
            raise ValueError("no video stream in file")
        stream = container.streams.video[0]
        stream.thread_count = threads
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        n = int(stream.frames or 0)
        if n <= 0:  # container does not say: count packets (no decoding)
            n = sum(1 for p in container.demux(stream) if p.size > 0)
            container.seek(0)
        ctx = stream.codec_context
        idx = _pick(n, fps, lambda: (int(ctx.height), int(ctx.width)), frames, sample_fps, picker)
        if not idx:
            raise ValueError("video has no frames")
        wanted = set(idx)
        out = {}
        decoded = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= idx[-1]:
                    break
        except av.error.FFmpegError as exc:  # damaged data part-way: judged below by how far it got
            if not out:
                raise
            log.debug("decoding stopped at frame %d: %s", decoded, exc)
    if not out:
        raise ValueError("no frame could be decoded")
    got = [i for i in idx if i in out]
    if len(got) < len(idx) and decoded < 0.95 * n:
        # the stream ends well before the frame count its header gives: the file was cut short.
        # (A header off by a frame or two is common and only loses the last sampled frame.)
        raise VideoFileTruncated(f"only {len(got)} of the {len(idx)} sampled frames decode: the stream stops "
                                 f"at frame {decoded} of the {n} its header gives (file cut short?)")
    return DecodedVideo(np.stack([out[i] for i in got]), got, fps, n, "pyav")


TORCHCODEC_MISSING = ("torchcodec is not installed or cannot load: `pip install -c constraints.txt -e '.[torchcodec]'` "
                      "and the system FFmpeg libraries (Debian/Ubuntu: `apt-get install libavcodec59 libavformat59 "
                      "libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8`); or use data.video_backend=auto")


def torchcodec_available() -> str | None:
    """None when TorchCodec can decode here; else the reason and the fix, in one line."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as exc:  # ImportError, or OSError/RuntimeError when FFmpeg's libraries are missing
        return f"{TORCHCODEC_MISSING} ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})"
    return None


def _decode_torchcodec(source, frames: int, sample_fps: float, threads: int = 1,
                       picker: Optional[FramePicker] = None) -> DecodedVideo:
    from torchcodec.decoders import VideoDecoder

    if isinstance(source, memoryview):
        source = bytes(source)
    # exact seek mode: the frame count comes from a scan of the file (as decord's), not the header
    decoder = VideoDecoder(source, dimension_order="NHWC", num_ffmpeg_threads=threads, seek_mode="exact")
    meta = decoder.metadata
    n = int(meta.num_frames or 0)
    fps = float(meta.average_fps or 0.0)
    idx = _pick(n, fps, lambda: (int(meta.height), int(meta.width)), frames, sample_fps, picker)
    if not idx:
        raise ValueError("video has no frames")
    data = decoder.get_frames_at(indices=idx).data.numpy()
    return DecodedVideo(data, idx, fps, n, "torchcodec")


class VideoFileTruncated(ValueError):
    """The stream ends long before the frame count its header gives."""


class VideoBackend(Choice):
    """What decodes videos (``data.video_backend``)."""

    auto = "auto"  # decord, then PyAV for what decord cannot decode (e.g. AV1)
    decord = "decord"
    pyav = "pyav"
    torchcodec = "torchcodec"  # optional extra (panda[torchcodec]) over the system's FFmpeg libraries


DECODERS = {"decord": _decode_decord, "pyav": _decode_pyav, "torchcodec": _decode_torchcodec}
BACKEND_ORDER = {VideoBackend.auto: ("decord", "pyav"), VideoBackend.decord: ("decord",), VideoBackend.pyav: ("pyav",),
                 VideoBackend.torchcodec: ("torchcodec",)}


def _backend(backend: str) -> VideoBackend:
    try:
        return VideoBackend(backend)
    except ValueError:
        raise ValueError(f"unknown video backend {backend!r}; use {', '.join(VideoBackend)}") from None


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming the fix when ``backend`` cannot decode on this machine."""
    backend = _backend(backend)
    if backend == "torchcodec":
        problem = torchcodec_available()
        if problem:
            raise ValueError(f"video backend torchcodec: {problem}")


def decode_video(source: VideoSource, frames: int, sample_fps: float = 1.0, backend: str = "auto",
                 name: str | None = None, threads: int = 1, picker: Optional[FramePicker] = None) -> DecodedVideo:
    """Decode the sampled frames of ``source``: a file path, or a video's encoded bytes (then
    ``name`` says where they came from, for error messages).

    ``backend``: ``auto`` (decord, then PyAV on any failure), ``decord``, ``pyav`` or ``torchcodec``.
    ``threads``: the decoder's own threads (1 in a loader worker: the workers are the parallelism).
    ``picker``: chooses the frame indices from the video's length, fps and size (long-video sampling
    modes, :mod:`panda.data.budget`); default: ``frames`` of them, the release's way.
    Raises :class:`VideoDecodeError` naming the file when nothing works.
    """
    if isinstance(source, (bytes, memoryview)):
        path = name or "<video bytes>"
        if len(source) == 0:
            raise VideoDecodeError(path, "video is empty (0 bytes)", code="empty_file")
    else:
        path = source = os.fspath(source)
        _check_file(path)
    order = BACKEND_ORDER[_backend(backend)]
    errors, code = [], "undecodable"
    for name in order:
        try:
            return DECODERS[name](source, frames, sample_fps, threads, picker)
        except Exception as exc:
            if isinstance(exc, VideoFileTruncated):
                code = "truncated"  # decord raises DECORDError (not a RuntimeError); catch at the boundary
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            log.debug("decoder %s failed on %s: %s", name, path, exc)
    raise VideoDecodeError(path, "; ".join(errors), code=code)


@dataclass
class VideoProbe:
    """What the container says about a video, read without decoding it."""

    width: int
    height: int
    fps: float
    num_frames: int  # 0 when the container does not say
    codec: str
    container: str
    seconds: Optional[float] = None  # the length the container states (None when it states none)


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Open ``path`` with PyAV and read its first video stream's header.

    Raises :class:`VideoDecodeError` with code ``missing``, ``empty_file``, ``unreadable`` (not a
    container FFmpeg can open: garbage bytes, or a file cut before its index) or
    ``no_video_stream`` (e.g. an audio-only file).
    """
    import av

    path = os.fspath(path)
    _check_file(path)
    try:
        container = av.open(path)
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise VideoDecodeError(path, f"not a readable video container: {str(exc).strip()[:200]}", code="unreadable") from exc
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoDecodeError(path, f"no video stream (streams: {', '.join(kinds)})", code="no_video_stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        if container.duration:
            seconds = container.duration / av.time_base
        elif stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            rate = float(stream.average_rate or 0)
            seconds = stream.frames / rate if stream.frames and rate else None
        return VideoProbe(int(ctx.width), int(ctx.height), fps, int(stream.frames or 0), str(ctx.name),
                          str(container.format.name), seconds)
