"""STAB speed: the batched forward vs the per-frame loop of the official code, in one process.

    python benchmarks/stab_speed.py            # release sizes (d=1024, 448 px, 8 frames), CPU fp32
    python benchmarks/stab_speed.py --quick    # smaller, for a smoke run

Prints forward time (median), FLOPs and the FLOP-bound time at this machine's measured matmul
rate, and aten op counts (a proxy for GPU kernel launches) for 1 and 4 videos.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from stab_reference import looped_stab_forward  # this folder's per-frame reference

from panda.data.frames import preprocess_frames
from panda.models.stab import STAB, STABConfig, build_projector


def make_batch(videos: int, frames: int, resolution: int, patch: int, height: int = 360, width: int = 640):
    rng = np.random.default_rng(0)
    out = [preprocess_frames(rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8), frames, resolution, patch) for _ in range(videos)]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ops that only make views or metadata, or only dispatch to the op that computes (no kernel of their own)
NO_KERNEL = {
    "aten::as_strided", "aten::view", "aten::_unsafe_view", "aten::_reshape_alias", "aten::reshape", "aten::transpose",
    "aten::t", "aten::numpy_T", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::select",
    "aten::slice", "aten::narrow", "aten::flatten", "aten::split", "aten::split_with_sizes", "aten::unbind",
    "aten::chunk", "aten::alias", "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::result_type", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::new_empty", "aten::resize_", "aten::as_strided_", "aten::contiguous", "aten::to", "aten::item",
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::linear", "aten::matmul", "aten::layer_norm",
    "aten::batch_norm", "aten::_batch_norm_impl_index", "aten::conv2d", "aten::conv3d", "aten::convolution",
    "aten::_convolution", "aten::scaled_dot_product_attention", "aten::dropout", "aten::scalar_tensor",
}


def op_count(fn, kernels_only: bool = False) -> int:
    """aten ops ``fn`` dispatches; ``kernels_only``: those that compute (a closer proxy for GPU kernel
    launches: views, allocations and dispatch-only wrappers such as ``linear`` -> ``addmm`` left out)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages()
               if e.key.startswith("aten::") and not (kernels_only and e.key in NO_KERNEL))


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = timed(lambda: a @ b, 5)
    return 2 * 2048**3 / t / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 256, 224 px: a fast smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--aspect", choices=["square", "16:9"], default="square", help="square: 273 tokens per frame")
    args = parser.parse_args()
    cfg = STABConfig(width=256, resolution=224) if args.quick else STABConfig()
    frames, llm_width = 8, 4096
    torch.manual_seed(0)
    stab = STAB(cfg).eval().requires_grad_(False)  # inference timing
    projector = build_projector("mlp2x_gelu", cfg.width, llm_width).eval().requires_grad_(False)
    height, width = (480, 480) if args.aspect == "square" else (360, 640)
    pixels, mask = make_batch(1, frames, cfg.resolution, cfg.patch_size, height, width)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, STAB d={cfg.width}, {cfg.resolution}px, "
          f"{frames} frames of a {width}x{height} video")

    with torch.no_grad():
        batched = stab(pixels, mask)
        looped = looped_stab_forward(stab, pixels, mask)
        assert torch.allclose(batched.tokens, looped.tokens, atol=1e-4), "batched and looped STAB disagree"
        t_batched = timed(lambda: stab(pixels, mask), args.repeats)
        t_looped = timed(lambda: looped_stab_forward(stab, pixels, mask), args.repeats)
        t_proj = timed(lambda: projector(batched.tokens), args.repeats)
        with FlopCounterMode(display=False) as counter:
            stab(pixels, mask)
        stab_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            projector(batched.tokens)
        proj_flops = counter.get_total_flops()
    rate = matmul_gflops()
    tokens = batched.tokens.shape[0]
    print(f"visual tokens per video: {tokens} ({batched.lengths[0, 0].item()} per frame)")
    print(f"matmul rate on this machine: {rate:.0f} GFLOP/s fp32")
    print(f"STAB forward        batched {t_batched * 1e3:8.1f} ms   looped {t_looped * 1e3:8.1f} ms   speed-up x{t_looped / t_batched:.2f}")
    print(f"STAB FLOPs          {stab_flops / 1e9:8.2f} GFLOP   FLOP-bound {stab_flops / rate / 1e6:8.1f} ms   achieved {stab_flops / t_batched / 1e9:.0f} GFLOP/s")
    print(f"projector forward   {t_proj * 1e3:8.1f} ms   {proj_flops / 1e9:.2f} GFLOP")
    print(f"STAB + projector    {(t_batched + t_proj) * 1e3:8.1f} ms   {(stab_flops + proj_flops) / 1e9:.2f} GFLOP = "
          f"{(stab_flops + proj_flops) / 2e9:.1f} GMAC (the paper's 105.5 'GFLOPs' for 8 square frames count multiply-adds)")

    small = STAB(STABConfig(width=64, resolution=cfg.resolution)).eval()  # op counts do not depend on width
    for videos in (1, 4):
        px, mk = make_batch(videos, frames, cfg.resolution, cfg.patch_size, height, width)
        with torch.no_grad():
            n_b = op_count(lambda: small(px, mk))
            n_l = op_count(lambda: looped_stab_forward(small, px, mk))
        print(f"aten ops, {videos} video(s) x {frames} frames: batched {n_b:6d}   looped {n_l:6d}   ratio x{n_l / n_b:.1f}")
    mixed_aspect_ops(small, frames, cfg.resolution, cfg.patch_size)


MIXED = [(480, 480), (360, 640), (480, 640), (640, 360)]  # square, 16:9, 4:3, 9:16 portrait


def mixed_aspect_ops(stab, frames: int, resolution: int, patch: int) -> None:
    """Op counts of batches that mix aspect ratios (each a crop shape of its own), forward only and
    forward + backward; the batched outputs are checked against the per-frame reference first."""
    for videos in (1, 2, 4):
        parts = [make_batch(1, frames, resolution, patch, h, w) for h, w in MIXED[:videos]]
        px, mk = torch.cat([p for p, _ in parts]), torch.cat([m for _, m in parts])
        with torch.no_grad():
            assert torch.allclose(stab(px, mk).tokens, looped_stab_forward(stab, px, mk).tokens, atol=1e-4)
            fwd = op_count(lambda: stab(px, mk))
            kernels = op_count(lambda: stab(px, mk), kernels_only=True)
            ref = op_count(lambda: looped_stab_forward(stab, px, mk))
        stab.train()
        both = op_count(lambda: stab(px, mk).tokens.sum().backward())
        stab.eval()
        shapes = ", ".join(f"{w}x{h}" for h, w in MIXED[:videos])
        print(f"aten ops, mixed aspect ratios ({shapes}) x {frames} frames: forward {fwd:5d}, computing {kernels:4d} "
              f"(looped {ref:6d})   forward+backward {both:5d}")


def kv_split(repeats: int = 4) -> None:
    """Taking k and v out of one packed projection, as LSD, FSRA and GSTRA do: ``kv[0], kv[1]``
    (backward zero-fills a full-size gradient per index) vs ``kv.unbind(0)`` (one stack), forward
    + backward of the attention at the LSD's release size (2 videos x 8 frames x 256 windows, d=1024)."""
    import torch.nn.functional as F

    n, length, heads, hd = 2 * 8 * 256, 4, 8, 128
    x = torch.randn(n, length, 2 * heads * hd, requires_grad=True)
    q = torch.randn(n, heads, 1, hd)

    def run(mode):
        kv = x.view(n, length, 2, heads, hd).permute(2, 0, 3, 1, 4)
        k, v = (kv[0], kv[1]) if mode == "index" else kv.unbind(0)
        F.scaled_dot_product_attention(q, k, v).sum().backward()
        x.grad = None

    times = {"index": [], "unbind": []}
    for mode in ["index", "unbind"] * repeats:  # interleaved: both see the same machine state
        run(mode)
        start = time.perf_counter()
        run(mode)
        times[mode].append(time.perf_counter() - start)
    a, b = statistics.median(times["index"]), statistics.median(times["unbind"])
    print(f"k/v from a packed projection, fwd+bwd: kv[0], kv[1] {a * 1e3:.1f} ms   unbind {b * 1e3:.1f} ms   x{a / b:.2f}")


if __name__ == "__main__":
    main()
    kv_split()
