"""What STAB's temporal compression switches cost: STAB's forward (and forward + backward) with each
switch against the same STAB with them off, in one process, on this CPU; plus the visual tokens each
hands the LLM (docs/model-reference.md, "Temporal token compression").

    python benchmarks/compression_speed.py            # d=256, 224 px, 2 videos x 32 frames (16:9), CPU fp32
    python benchmarks/compression_speed.py --quick    # smaller, for a smoke run

The compression itself adds work after STAB (a similarity per spatial token and frame, a gather and a
scatter); what it saves is in the LLM, which gets fewer positions: the token column, not timed here.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from stab_speed import timed  # this folder's median-of-repeats timer, after one warm-up call

from panda.data.frames import preprocess_frames
from panda.models.stab import STAB, STABConfig

# the baseline runs first and again last: the two "off" rows show how far the machine's timing drifts
SWITCHES = [("off", {}), ("merge_keep=0.25", {"merge_keep": 0.25}), ("merge_keep=0.5", {"merge_keep": 0.5}),
            ("temporal_pool=2", {"temporal_pool": 2}), ("temporal_pool=4", {"temporal_pool": 4}), ("off (again)", {})]


def make_batch(videos: int, frames: int, resolution: int, patch: int, height: int = 360, width: int = 640):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = []
    for _ in range(videos):  # a slowly changing scene, as in real video, plus noise
        clip = np.stack([np.roll(base, 4 * f, axis=1) for f in range(frames)])
        clip = np.clip(clip + rng.integers(-8, 8, clip.shape), 0, 255).astype(np.uint8)
        out.append(preprocess_frames(clip, frames, resolution, patch))
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    width, resolution, videos, frames = (64, 112, 2, 16) if args.quick else (256, 224, 2, 32)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pixels, mask = make_batch(videos, frames, resolution, 14)
    print(f"STAB d={width}, {resolution} px canvas, {videos} videos x {frames} frames of 640x360, CPU fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'switch':<18}{'tokens/video':>14}{'forward ms':>12}{'x off':>8}{'fwd+bwd ms':>12}{'x off':>8}")
    base = None
    for name, switch in SWITCHES:
        torch.manual_seed(0)
        stab = STAB(STABConfig(width=width, heads=4, resolution=resolution, dropout=0.0, **switch)).train()

        def forward():
            with torch.no_grad():
                return stab(pixels, mask)

        def step():
            stab.zero_grad(set_to_none=True)
            stab(pixels, mask).tokens.pow(2).mean().backward()

        tokens = int(forward().host_lengths.sum()) // videos
        fwd, both = timed(forward, args.repeats) * 1e3, timed(step, args.repeats) * 1e3
        base = base or (fwd, both)
        print(f"{name:<18}{tokens:>14,}{fwd:>12.1f}{fwd / base[0]:>8.2f}{both:>12.1f}{both / base[1]:>8.2f}")


if __name__ == "__main__":
    main()
