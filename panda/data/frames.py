"""Resize, pad, mask and normalise sampled frames (docs/model-reference.md, "Input frames").

The long side becomes ``resolution``; the short side is rounded *up* to whole teacher patches
(``ceil(base · short/long / patch)`` of them, ``base = resolution / ratio``) and scaled by
``ratio``; the frame is pasted into a square canvas centred on whole teacher patches. The canvas
holds the normalisation mean (0 after normalising) and the mask is 1 exactly on the pasted region.
All frames of a video share one box. With the release values (448, patch 14, ratio 2) a 16:9
frame becomes 448 × 252 pasted at row 84.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from panda.constants import CLIP_MEAN, CLIP_STD  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class FrameGeometry:
    """Where a ``height × width`` video lands on the square canvas (pixels)."""

    out_h: int
    out_w: int
    top: int
    left: int


def frame_geometry(height: int, width: int, resolution: int, patch_size: int, ratio: int = 2) -> FrameGeometry:
    if resolution % (patch_size * ratio):
        raise ValueError(
            f"resolution {resolution} must be a multiple of patch_size*ratio = {patch_size * ratio}"
        )
    base = resolution // ratio  # the teacher resolution (224 in the release)
    grid = base // patch_size  # teacher patches per side (16)
    long_side, short_side = max(height, width), min(height, width)
    valid = min(grid, math.ceil(base * short_side / long_side / patch_size))
    short_px = valid * patch_size * ratio
    offset = ((grid - valid) // 2) * patch_size * ratio
    if height >= width:
        return FrameGeometry(resolution, short_px, 0, offset)
    return FrameGeometry(short_px, resolution, offset, 0)


def resize_frames(frames: np.ndarray | torch.Tensor, num_frames: int, resolution: int, patch_size: int,
                  ratio: int = 2) -> tuple[torch.Tensor, FrameGeometry]:
    """The first ``num_frames`` of ``frames`` (k, H, W, 3) resized to the region they fill on the
    canvas: (k, 3, out_h, out_w), uint8 for uint8 input (resized in uint8, as PIL does, within 1
    level of PIL's bicubic and ~10x faster than in float), else float in [0, 1]. This is what
    ``prepare --store frames`` stores, so a stored video and a decoded one give the same pixels."""
    video = torch.as_tensor(np.asarray(frames)) if not torch.is_tensor(frames) else frames
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (k, H, W, 3), got {tuple(video.shape)}")
    k, height, width, _ = video.shape
    geo = frame_geometry(height, width, resolution, patch_size, ratio)
    x = video[: min(k, num_frames)].permute(0, 3, 1, 2)  # (k, H, W, 3) -> (k, 3, H, W), a channels-last view
    if x.shape[0] == 0:
        return x, geo
    if x.dtype == torch.uint8:
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(geo.out_h, geo.out_w),
                          mode="bicubic", antialias=True, align_corners=False)
    else:
        x = F.interpolate(x.float().div(255.0), size=(geo.out_h, geo.out_w), mode="bicubic", antialias=True,
                          align_corners=False).clamp_(0.0, 1.0)
    return x, geo


def place_frames(resized: torch.Tensor, geo: FrameGeometry, num_frames: int, resolution: int, mean=CLIP_MEAN,
                 std=CLIP_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, 3, out_h, out_w) frames from :func:`resize_frames` -> normalised ``pixels`` (num_frames, 3,
    R, R) on the mean-filled canvas and ``mask`` (num_frames, R, R), 1 exactly on the pasted region.
    Frames past ``k`` (a short video) are all-zero with an all-zero mask."""
    pixels = torch.zeros(num_frames, 3, resolution, resolution)
    mask = torch.zeros(num_frames, resolution, resolution)
    k = min(resized.shape[0], num_frames)
    if k == 0:
        return pixels, mask
    x = resized[:k]
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    x = x.sub_(mean_t).div_(std_t)
    pixels[:k, :, geo.top : geo.top + geo.out_h, geo.left : geo.left + geo.out_w] = x
    mask[:k, geo.top : geo.top + geo.out_h, geo.left : geo.left + geo.out_w] = 1.0
    return pixels, mask


def preprocess_frames(
    frames: np.ndarray | torch.Tensor,
    num_frames: int,
    resolution: int,
    patch_size: int,
    ratio: int = 2,
    mean=CLIP_MEAN,
    std=CLIP_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``frames``: (k, H, W, 3) uint8 RGB, k <= num_frames.

    Returns ``pixels`` (num_frames, 3, R, R) float32, normalised, and ``mask`` (num_frames, R, R)
    float32 in {0, 1}. Missing frames (a video shorter than ``num_frames``) are all-zero with an
    all-zero mask.
    """
    resized, geo = resize_frames(frames, num_frames, resolution, patch_size, ratio)
    return place_frames(resized, geo, num_frames, resolution, mean, std)


def patch_validity(mask: torch.Tensor, patch_size: int) -> np.ndarray:
    """The patches more than half inside a frame mask, on the host: (..., R, R) -> (..., R/p, R/p) bool.
    STAB finds the same from the mask on the device; made here, where the mask is made, STAB need not
    read its crop boxes back from the device."""
    r = mask.shape[-1]
    flat = mask.reshape(-1, 1, r, r).float()
    valid = F.avg_pool2d(flat, patch_size)[:, 0] > 0.5
    return valid.reshape(*mask.shape[:-2], r // patch_size, r // patch_size).numpy()
