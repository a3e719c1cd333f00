"""Sequence packing (``data.packing``) measured: padding on a Valley-like mix, and a real training
step padded vs packed, in one process on this CPU.

    python benchmarks/packing.py [--only padding|step] [--threads 2]

**Padding** (no model; the same row planner the model uses, ``panda.models.packing.plan_rows``).
20,000 samples as the LLM sees them at release sizes (8 frames, 448 px). Visual tokens per video
come from its aspect ratio. The aspect shares are an assumption, not measured from Valley:
16:9 60%, 4:3 20%, square 10%, 9:16 portrait 10%. Text lengths come from the Valley /
Video-ChatGPT mix of ``benchmarks/data_pipeline.py``. Micro-batches of 8 are drawn the way the
sampler draws them, in random order or length-grouped. Each is then padded to its longest sample,
or packed with the default row width (the longest sample) or with wider rows. For every variant it
prints the padded share of the positions the LLM computes and the attention cost relative to
padded batches: the sum over rows of width² (sdpa with a block-diagonal mask), and the sum of
sample length² (what flash-attention's variable-length kernel computes).

**Step** (real model): a LLaMA 768 wide, 8 layers, 32K vocabulary (~100M parameters) behind the
release STAB (width 1024) at 4 frames. Four videos: a square one with a long conversation, and
16:9, 4:3 and portrait ones with short ones. Forward + backward + AdamW, padded vs packed, same
weights. It prints the losses (equal), the real tokens per second and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from panda.models.packing import padded_share, plan_rows

ASPECTS = [("16:9", 360, 640, 0.60), ("4:3", 480, 640, 0.20), ("square", 480, 480, 0.10), ("9:16", 640, 360, 0.10)]
FRAMES = 8


def visual_tokens(height: int, width: int, frames: int = FRAMES) -> int:
    from panda.data.budget import SamplingConfig, sampling_rule
    from panda.models.stab import STABConfig

    return frames * sampling_rule(SamplingConfig(), STABConfig(), frames).tokens_per_frame(height, width)


def text_lengths(rng, records: int) -> np.ndarray:
    valley = 14 + rng.lognormal(np.log(45), 0.6, size=int(records * 0.875))
    vcg = 16 + rng.lognormal(np.log(160), 0.5, size=records - len(valley))
    lengths = np.concatenate([valley, vcg]).astype(int) + 12
    rng.shuffle(lengths)
    return lengths


def padding(seed: int = 0, records: int = 20000, batch_size: int = 8) -> None:
    from panda.data.sampling import EpochBatchSampler, SourceSpec

    rng = np.random.default_rng(seed)
    text = text_lengths(rng, records)
    shares = np.array([a[3] for a in ASPECTS])
    kinds = rng.choice(len(ASPECTS), size=records, p=shares / shares.sum())
    vis = np.array([visual_tokens(h, w) for _, h, w, _ in ASPECTS])[kinds]
    total = text + vis - FRAMES  # each frame's placeholder becomes its tokens
    print(f"visual tokens per video ({FRAMES} frames): "
          + ", ".join(f"{name} {visual_tokens(h, w)}" for name, h, w, _ in ASPECTS)
          + f"; median sample {int(np.median(total))} positions")
    print(f"{'batches':<34} {'layout':<30} {'padded':>8} {'attn (sdpa)':>12} {'attn (varlen)':>14}")
    for name, grouped, key in (("random", False, text), ("length-grouped by text (today)", True, text),
                               ("length-grouped by all tokens", True, total)):
        sampler = EpochBatchSampler([SourceSpec("mix", records, list(range(records)), key.tolist())], batch_size,
                                    seed=seed, group_by_length=grouped, group_batches=32)
        batches = sampler.epoch_batches(0)
        base_attn = sum(len(b) * int(total[b].max()) ** 2 for b in batches)
        varlen = sum(int((total[b].astype(np.int64) ** 2).sum()) for b in batches)
        for layout, capacity in (("padded", 0), ("packed, rows <= longest", None), ("packed, rows <= 2 x longest", 2),
                                 ("packed, rows <= 6,272 (max_length)", 6272)):
            computed = real = attn = 0
            for b in batches:
                ls = total[b].tolist()
                if capacity == 0:
                    rows = [[i] for i in range(len(ls))]
                else:
                    rows = plan_rows(ls, 2 * max(ls) if capacity == 2 else capacity)
                width = max(sum(ls[i] for i in row) for row in rows)
                computed += width * len(rows)
                real += sum(ls)
                attn += len(rows) * width ** 2
                assert abs((1 - sum(ls) / (width * len(rows))) - padded_share(ls, rows)) < 1e-9
            print(f"{name:<34} {layout:<30} {1 - real / computed:8.1%} {attn / base_attn:12.2f} {varlen / base_attn:14.2f}")


def step(threads: int, repeats: int = 3) -> None:
    from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
    from panda.data.frames import frame_geometry
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    frames, res = 4, 448
    stab = STABConfig(chunk_size=4, dropout=0.0)
    llm = build_llm(32000, hidden_size=768, layers=8, heads=12, intermediate_size=2048, max_position_embeddings=8192)
    model = VideoLanguageModel(stab, llm).train()
    videos = [("square", 480, 480, 900), ("16:9", 360, 640, 60), ("4:3", 480, 640, 120), ("9:16", 640, 360, 80)]
    g = torch.Generator().manual_seed(1)
    width = 1 + frames + max(v[3] for v in videos)
    B = len(videos)
    ids = torch.zeros(B, width, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX)
    pixels = torch.randn(B, frames, 3, res, res, generator=g)
    frame_mask = torch.zeros(B, frames, res, res)
    for b, (_, h, w, n) in enumerate(videos):
        row = torch.cat([torch.tensor([1] + [IMAGE_PLACEHOLDER_ID] * frames), torch.randint(3, 32000, (n,), generator=g)])
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
        labels[b, len(row) - n // 3:len(row)] = row[len(row) - n // 3:]
        geo = frame_geometry(h, w, res, stab.patch_size, stab.ratio)
        frame_mask[b, :, geo.top:geo.top + geo.out_h, geo.left:geo.left + geo.out_w] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for pack in (False, True, False, True):  # alternate, twice: drift of the machine hits both
        model.load_state_dict(state)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(ids, mask, pixels, frame_mask, labels, pack=pack)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            model.load_state_dict(state)
        r = results.setdefault(pack, {"times": [], "out": out})
        r["times"] += times
    real = int(results[False]["out"].positions.sum())
    print(f"step: 4 videos ({', '.join(v[0] for v in videos)}), {real} real LLM positions, {threads} threads")
    for pack, r in results.items():
        out = r["out"]
        t = statistics.median(r["times"])
        print(f"  {'packed' if pack else 'padded':<7} loss {out.loss.item():.6f}  computed positions {out.padded_positions:>5} "
              f"(padding {out.padded_fraction_all:.1%})  step {t:6.2f} s  {real / t:7.0f} real tokens/s")
    speedup = statistics.median(results[False]["times"]) / statistics.median(results[True]["times"])
    print(f"  packed / padded tokens/s: {speedup:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["padding", "step"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.only in (None, "padding"):
        padding()
    if args.only in (None, "step"):
        step(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
