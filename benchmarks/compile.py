"""``model.compile`` measured: STAB at release sizes, eager vs compiled, and the graphs compiled as
batches bring new mixes of aspect ratios, in one process on this CPU.

    python benchmarks/compile.py [--backend inductor] [--frames 4] [--threads 2]

Release STAB (d=1024, 448 px) and the projector to 4096, in training mode (dropout 0 so both runs
compute the same). The batches are 2 videos each, in four different mixes of aspect ratios. It prints
for eager and compiled: each batch's forward + backward time (the first compiled one includes
compiling), the median over the batches after warm-up, the compiled graphs after each batch, and the
largest difference in the visual tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this folder's modules, also when imported from elsewhere

from stab_speed import make_batch  # noqa: E402

MIXES = [[(480, 480), (360, 640)], [(360, 640), (360, 640)], [(480, 640), (640, 360)], [(480, 480), (480, 640)],
         [(360, 640), (640, 360)], [(480, 480), (480, 480)]]


def run(model, batches, repeats: int) -> tuple[list[float], list[int], list[torch.Tensor]]:
    from panda.models.compiled import compiled_graphs

    times, graphs, outputs = [], [], []
    for pixels, mask in batches:
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = model.projector(model.stab(pixels, mask).tokens)
            tokens.float().pow(2).mean().backward()
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        graphs.append(compiled_graphs())
        outputs.append(tokens.detach())
    return times, graphs, outputs


def main(argv=None) -> int:
    from panda.models.compiled import compile_model
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = STABConfig(chunk_size=min(4, args.frames), dropout=0.0)
    batches = []
    for mix in MIXES:
        parts = [make_batch(1, args.frames, cfg.resolution, cfg.patch_size, h, w) for h, w in mix]
        batches.append((torch.cat([p for p, _ in parts]), torch.cat([m for _, m in parts])))
    torch.manual_seed(0)
    tiny_llm = build_llm(64, hidden_size=4096, layers=1, heads=32, intermediate_size=64)  # the projector's width
    eager = VideoLanguageModel(cfg, tiny_llm).train()
    t_eager, _, out_eager = run(eager, batches, 1)
    compiled = VideoLanguageModel(cfg, tiny_llm).train()
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, args.backend)
    t_comp, graphs, out_comp = run(compiled, batches, 1)
    diff = max(float((a - b).abs().max()) for a, b in zip(out_eager, out_comp))
    print(f"STAB + projector fwd+bwd, release sizes, {args.frames} frames, 2 videos per batch, backend {args.backend}")
    print(f"{'batch':<28} {'eager s':>8} {'compiled s':>11} {'graphs':>7}")
    for mix, a, b, g in zip(MIXES, t_eager, t_comp, graphs):
        print(f"{' + '.join(f'{w}x{h}' for h, w in mix):<28} {a:8.2f} {b:11.2f} {g:7d}")
    warm_e, warm_c = statistics.median(t_eager[2:]), statistics.median(t_comp[2:])
    print(f"after the first two batches: eager {warm_e:.2f} s, compiled {warm_c:.2f} s, x{warm_e / warm_c:.2f}; "
          f"graphs after batch 2: {graphs[1]}, after batch {len(MIXES)}: {graphs[-1]}; largest token difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
