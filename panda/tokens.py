"""How many visual tokens STAB gives a frame and a video, in one place: the model (its host-side
lengths), the data layer's token budget (``data.sampling=budget``) and the planner count with it.

A frame with a ``rows × cols`` grid of spatial tokens gets ``[context] + rows × (cols + [row token])``
tokens (docs/model-reference.md, "Tokens per frame"). The temporal compression switches
(docs/model-reference.md, "Temporal token compression") change what the frames after a video's first
get:

- ``merge_keep=q``: each later frame keeps ``ceil(q × rows × cols)`` of its spatial tokens (the ones
  that changed most since the previous frames) plus its context token and its row tokens;
- ``temporal_pool=k``: the first frame of every ``k`` keeps a full grid (the mean of the ``k`` frames'
  spatial tokens); the others keep their context token alone.
"""

from __future__ import annotations

import math


def frame_tokens(rows: int, cols: int, context: bool = True, row_tokens: bool = True) -> int:
    """Visual tokens of one uncompressed frame with ``rows × cols`` spatial tokens."""
    return int(context) + rows * (cols + int(row_tokens))


def merge_kept(rows: int, cols: int, merge_keep: float) -> int:
    """Spatial tokens a later frame keeps under ``merge_keep``."""
    return min(rows * cols, max(1, math.ceil(merge_keep * rows * cols)))


def frame_lengths(frames: int, rows: int, cols: int, context: bool = True, row_tokens: bool = True,
                  merge_keep: float | None = None, temporal_pool: int = 1) -> list[int]:
    """Visual tokens of each of a video's ``frames`` frames (all with a ``rows × cols`` grid)."""
    full = frame_tokens(rows, cols, context, row_tokens)
    if merge_keep is not None:
        later = int(context) + merge_kept(rows, cols, merge_keep) + rows * int(row_tokens)
        return [full] + [later] * (frames - 1) if frames else []
    if temporal_pool > 1:
        return [full if f % temporal_pool == 0 else int(context) for f in range(frames)]
    return [full] * frames


def video_tokens(frames: int, rows: int, cols: int, context: bool = True, row_tokens: bool = True,
                 merge_keep: float | None = None, temporal_pool: int = 1) -> int:
    """Visual tokens of a video of ``frames`` frames with a ``rows × cols`` grid, after compression."""
    return sum(frame_lengths(frames, rows, cols, context, row_tokens, merge_keep, temporal_pool))


def frames_within(budget: int, max_frames: int, chunk: int, rows: int, cols: int, context: bool = True,
                  row_tokens: bool = True, merge_keep: float | None = None, temporal_pool: int = 1) -> int:
    """The most frames, in whole chunks of ``chunk`` and at most ``max_frames``, whose :func:`video_tokens`
    fit ``budget`` (at least one chunk): what a token budget buys a video with a ``rows × cols`` grid."""
    count = chunk
    while count + chunk <= max_frames and \
            video_tokens(count + chunk, rows, cols, context, row_tokens, merge_keep, temporal_pool) <= budget:
        count += chunk
    return count
