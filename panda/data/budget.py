"""How many frames a video gets, and which (``data.sampling``).

- ``release`` (default): ``frames`` per video, the release's way (docs/model-reference.md, "Frame sampling").
- ``fps``: frames at ``sample_fps`` over the whole video, at most ``max_frames``.
- ``budget``: as many frames as fit ``max_visual_tokens`` given the video's aspect ratio (a 16:9
  frame costs 154 visual tokens at release sizes, a square one 273), at most ``max_frames``.

In the last two the count is rounded down to whole STAB chunks (``stab.chunk_size`` frames: LSTE
mixes frames within a chunk, so a chunk is never cut) and is at least one chunk; the frames are
then picked the release's way (1 fps candidates, ``linspace``), so they are deterministic — no
randomness, the same frames every epoch and in evaluation. A video shorter than its count is
padded as the release pads (all-zero frames, mask zero), to whole chunks. A batch mixing counts
is padded to its largest with *absent* frames, which STAB never sees and the LLM never gets tokens
for (``VideoLanguageModel.encode_video``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from panda.choices import Choice
from panda.data.frames import frame_geometry
from panda.data.video import sample_frame_indices
from panda.tokens import frame_tokens, frames_within, video_tokens


class Sampling(Choice):
    """How many frames a video gets (``data.sampling``; the module docstring)."""

    release = "release"  # `frames` per video, the release's way
    fps = "fps"  # frames at sample_fps over the whole video, at most max_frames
    budget = "budget"  # as many frames as fit max_visual_tokens (from the video's aspect ratio)


@dataclass
class SamplingConfig:
    """The frame sampling settings, declared once: training's ``data.*`` (``DataConfig``),
    ``evaluate.py``'s top-level keys (``EvaluateConfig``) and lmms-eval's ``model_args`` all are one."""

    # long videos: release | fps | budget; counts are whole STAB chunks
    sampling: Sampling = Sampling.release
    sample_fps: float = 1.0  # candidate frames per second of video (every round(fps / sample_fps)-th frame)
    max_frames: int = 64  # fps / budget: at most this many frames per video
    max_visual_tokens: int = 4096  # budget: visual tokens per video (a 16:9 frame: 154 at release sizes, square: 273)


@dataclass(frozen=True)
class SamplingRule:
    mode: Sampling = Sampling.release
    frames: int = 8  # release: the count
    sample_fps: float = 1.0
    max_frames: int = 64  # fps / budget: the cap
    max_visual_tokens: int = 0  # budget
    chunk_size: int = 4  # STAB's stab.chunk_size
    # STAB's token rule (docs/model-reference.md, "Tokens per frame"): what one frame of a given size costs
    resolution: int = 448
    patch_size: int = 14
    ratio: int = 2
    lsd_window: int = 2  # STAB's window (1 with stab.lsd=none)
    context_token: bool = True
    row_tokens: bool = True
    fixed_side: int = 0  # a reducer that gives every frame one square grid of tokens (stab.lsd=perceiver): its side
    merge_keep: Optional[float] = None  # STAB's temporal compression (stab.merge_keep, stab.temporal_pool):
    temporal_pool: int = 1  # a video's later frames cost fewer tokens, so a budget holds more frames

    def __post_init__(self):
        object.__setattr__(self, "mode", Sampling.parse(self.mode, "data.sampling"))
        if self.mode == "release":
            return
        if self.max_frames < self.chunk_size:
            raise ValueError(f"data.max_frames={self.max_frames} is less than one STAB chunk "
                             f"(stab.chunk_size={self.chunk_size}); raise it")
        if self.mode == "budget":
            chunk = self.chunk_size * self.square_tokens()
            if self.max_visual_tokens < chunk:
                raise ValueError(f"data.max_visual_tokens={self.max_visual_tokens} does not hold one STAB chunk of "
                                 f"square frames ({self.chunk_size} x {self.square_tokens()} = {chunk} tokens); "
                                 f"set data.max_visual_tokens >= {chunk}")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the spatial tokens STAB makes of a ``height × width`` video's frame."""
        geo = frame_geometry(height, width, self.resolution, self.patch_size, self.ratio)
        rows = self.fixed_side or geo.out_h // self.patch_size // self.lsd_window
        cols = self.fixed_side or geo.out_w // self.patch_size // self.lsd_window
        return rows, cols

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Visual tokens STAB makes of a ``height × width`` video's frame, before temporal compression."""
        return frame_tokens(*self.grid(height, width), self.context_token, self.row_tokens)

    def video_tokens(self, frames: int, height: int, width: int) -> int:
        """Visual tokens of ``frames`` frames of a ``height × width`` video, after temporal compression."""
        return video_tokens(frames, *self.grid(height, width), self.context_token, self.row_tokens, self.merge_keep,
                            self.temporal_pool)

    def square_tokens(self) -> int:
        """A square frame's tokens: the most any frame costs, and what a padding frame costs."""
        return self.tokens_per_frame(self.resolution, self.resolution)

    def frame_count(self, num_frames: int, fps: float, height: int, width: int) -> int:
        """The frames this video gets (whole chunks) in ``fps`` / ``budget`` mode."""
        T = self.chunk_size
        if self.mode == "fps":
            step = max(1, int(round(fps / self.sample_fps))) if fps and fps > 0 else 1
            count = min(math.ceil(num_frames / step), self.max_frames)
            return max(T, count // T * T)
        # budget: whole chunks of this video's frames within the budget (counted after temporal compression);
        # a video with fewer frames than that takes what it has, to whole chunks (its padding frames cost a
        # square frame's tokens)
        count = frames_within(self.max_visual_tokens, self.max_frames, T, *self.grid(height, width), self.context_token,
                              self.row_tokens, self.merge_keep, self.temporal_pool)
        if num_frames < count:
            count = max(T, num_frames // T * T)
        return max(T, count)

    def pick(self, num_frames: int, fps: float, size) -> list[int]:
        """The frame indices of one video (a :data:`panda.data.video.FramePicker`); ``size()`` gives
        (height, width) and is only called in budget mode."""
        if self.mode == "release":
            return sample_frame_indices(num_frames, fps, self.frames, self.sample_fps)
        height, width = size() if self.mode == "budget" else (self.resolution, self.resolution)
        return sample_frame_indices(num_frames, fps, self.frame_count(num_frames, fps, height, width), self.sample_fps)

    def padded_count(self, decoded: int) -> int:
        """Frames a sample has after padding ``decoded`` frames: ``frames`` (release) or whole chunks."""
        if self.mode == "release":
            return self.frames
        return max(self.chunk_size, math.ceil(decoded / self.chunk_size) * self.chunk_size)

    def visual_tokens(self, count: int, decoded: int, height: int, width: int) -> int:
        """Visual tokens of a sample of ``count`` frames, ``decoded`` of them real (compressed; the padding
        frames are not)."""
        return self.video_tokens(decoded, height, width) + (count - decoded) * self.square_tokens()


def sampling_rule(sampling: SamplingConfig, stab, frames: int) -> SamplingRule:
    """The rule of a run: ``sampling`` its sampling settings (a ``DataConfig`` or ``EvaluateConfig`` is
    one), ``stab`` its STABConfig, ``frames`` the release count."""
    return SamplingRule(sampling.sampling, frames, sampling.sample_fps, sampling.max_frames, sampling.max_visual_tokens,
                        stab.chunk_size, stab.resolution, stab.patch_size, stab.ratio, stab.window, stab.has_context_token,
                        stab.row_tokens, stab.fixed_side, stab.merge_keep, stab.temporal_pool)
