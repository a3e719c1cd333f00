"""LoRA on the LLM (``llm.adapter=lora``) against full fine-tuning, in one process on this CPU.

    python benchmarks/lora.py [--threads 2] [--steps 4]

A mid-size model (LLaMA 1024 wide, 12 layers, 32K vocabulary: ~190M LLM parameters; tiny STAB,
4 frames, 2 videos x 384 positions), the same batch, real training steps (forward, backward,
AdamW). For each: trainable parameters, the peak of live tensor memory during a step (the
profiler's allocator events, as ``benchmarks/plan_vs_measured.py`` measures it) next to the
planner's peak, and the median step time. Ratios are LoRA / full.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plan_vs_measured import COMMON, _profiled_peak_mib, batch, build, compose, live_bytes, training_step  # noqa: E402

VOCAB = 32000
TEXT = 384
MID = ["llm.hidden_size=1024", "llm.layers=12", "llm.heads=16", "llm.intermediate_size=2752"]
RUNS = [
    ("full fine-tuning", []),
    ("LoRA r16, all linears", ["llm.adapter=lora", "llm.lora.rank=16", "llm.lora.dropout=0.0"]),
    ("LoRA r16, q/v only", ["llm.adapter=lora", "llm.lora.rank=16", "llm.lora.dropout=0.0",
                            "llm.lora.target_modules=[q_proj,v_proj]"]),
]


def run(overrides: list[str], steps: int) -> dict:
    from panda.plan import plan

    cfg = compose(COMMON + MID + overrides)
    model = build(cfg, VOCAB)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    step = training_step(model, opt, batch(cfg, TEXT, VOCAB))
    step()  # AdamW's moments exist from here on
    peak = live_bytes(model, opt) / 2**20 + _profiled_peak_mib(step)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    planned = plan(cfg, gpu="cpu", text_tokens=TEXT, vocab=VOCAB).peak_gib * 1024
    return {"trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters()),
            "peak": peak, "planned": planned, "step": statistics.median(times)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'run':<24} {'trainable M':>12} {'of total M':>11} {'peak MiB':>9} {'planned':>8} {'step s':>7} "
          f"{'peak ratio':>11} {'speed-up':>9}")
    base = None
    for label, overrides in RUNS:
        r = run(overrides, args.steps)
        base = base or r
        print(f"{label:<24} {r['trainable'] / 1e6:12.2f} {r['total'] / 1e6:11.1f} {r['peak']:9.0f} {r['planned']:8.0f} "
              f"{r['step']:7.2f} {r['peak'] / base['peak']:11.3f} {base['step'] / r['step']:9.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
