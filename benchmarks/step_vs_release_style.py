"""A whole training step, panda vs the same computation written the way the release writes it, in
one process on this CPU, with equal weights and equal losses.

    python benchmarks/step_vs_release_style.py [--repeats 3] [--threads 2] [--frames 8]

The sizes are those of the throughput issue: release STAB, 8 frames, 2 videos (one square, one
16:9), a LLaMA 384 wide with 8 layers and a 32K vocabulary, distillation on, forward + backward.

- **release-style.** STAB looped per video, chunk and frame (``benchmarks/stab_reference.py``,
  with gradients), the batch padded to its longest sample, and the LM head and cross-entropy over
  every position (the LLM's own ``labels=`` loss).
- **panda.** Batched STAB, the LM head at the supervised positions only, padded; then packed into
  one row (``data.pack_length`` large enough for both samples).

It prints each variant's median step time, its loss (they must agree to 1e-4), and the speed-up
over release-style.
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

from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID  # noqa: E402


def build(frames: int):
    from panda.compat import is_batch_norm
    from panda.models.distill import DistillConfig
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.manual_seed(0)
    llm = build_llm(32000, hidden_size=384, layers=8, heads=6, intermediate_size=1024, max_position_embeddings=8192)
    model = VideoLanguageModel(STABConfig(chunk_size=min(4, frames), dropout=0.0), llm,
                               distill=DistillConfig(), teacher_width=1024).train()
    for m in model.modules():  # batch norm in eval: per-video (looped) and per-batch statistics would differ
        if is_batch_norm(m):
            m.eval()
    return model


def inputs(frames: int, text=(40, 30), supervised: int = 11):
    from panda.models.distill import TeacherFeatures

    parts = [make_batch(1, frames, 448, 14, h, w) for h, w in [(480, 480), (360, 640)]]
    pixels, mask = torch.cat([p for p, _ in parts]), torch.cat([m for _, m in parts])
    g = torch.Generator().manual_seed(1)
    width = 1 + frames + max(text)
    ids = torch.zeros(2, width, dtype=torch.long)
    attn = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), IGNORE_INDEX)
    for b, n in enumerate(text):
        row = torch.cat([torch.tensor([1] + [IMAGE_PLACEHOLDER_ID] * frames), torch.randint(3, 32000, (n,), generator=g)])
        ids[b, :len(row)], attn[b, :len(row)] = row, 1
        labels[b, len(row) - supervised:len(row)] = row[len(row) - supervised:]
    teacher = TeacherFeatures(torch.randn(2 * frames, 16, 16, 1024, generator=g), torch.ones(2 * frames, 16, 16, dtype=torch.bool))
    return ids, attn, labels, pixels, mask, teacher


def release_style(model, ids, attn, labels, pixels, mask, teacher):
    """The release's computation: per-frame STAB, padded batch, LM head on every position."""
    from stab_reference import looped_stab_forward
    from panda.models.stab import VisualTokens
    from panda.models.video_lm import splice_visual_tokens
    from panda.models.distill import distillation_loss

    looped = looped_stab_forward.__wrapped__(model.stab, pixels, mask)  # the undecorated loop: with gradients
    with torch.no_grad():  # the frames' grids and content flags, as the batched forward reports them
        meta = model.stab(pixels, mask)
    visual = VisualTokens(model.projector(looped.tokens), looped.lengths, meta.grids, meta.content)
    embeds = model.llm.get_input_embeddings()(ids.clamp(min=0))
    spliced = splice_visual_tokens(embeds, ids, attn, visual, labels)
    layers = list(model.distill_head.layers)
    out = model.llm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                    position_ids=spliced.position_ids, labels=spliced.labels, use_cache=False, output_hidden_states=True)
    spatial = spliced.visual_positions[visual.spatial_index(model.stab_cfg.has_context_token, model.stab_cfg.row_tokens)]
    picked = torch.stack([out.hidden_states[j].flatten(0, 1)[spatial] for j in layers], dim=1)
    distill = distillation_loss(model.distill_head, picked, visual.grids, visual.content, teacher, model.distill_cfg.loss)
    return out.loss + model.distill_cfg.weight * distill


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.frames)
    ids, attn, labels, pixels, mask, teacher = inputs(args.frames)
    variants = {
        "release-style": lambda: release_style(model, ids, attn, labels, pixels, mask, teacher),
        "panda, padded": lambda: model(ids, attn, pixels, mask, labels, teacher=teacher).loss,
        "panda, packed (one row)": lambda: model(ids, attn, pixels, mask, labels, teacher=teacher, pack=True,
                                                 pack_length=1 << 16).loss,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses = {}
    for _ in range(args.repeats + 1):  # interleaved; the first round warms up and is dropped
        for name, fn in variants.items():
            start = time.perf_counter()
            loss = fn()
            loss.backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            losses[name] = float(loss.detach())
            times[name].append(elapsed)
    base = statistics.median(times["release-style"][1:])
    print(f"training step (fwd+bwd), release STAB, {args.frames} frames, 2 videos (square + 16:9), LLaMA 384x8, 32K vocab, "
          f"distillation on, {args.threads} threads")
    for name in variants:
        t = statistics.median(times[name][1:])
        print(f"  {name:<30} {t:7.2f} s   loss {losses[name]:.6f}   x{base / t:.2f}")
    spread = max(losses.values()) - min(losses.values())
    print(f"  losses agree within {spread:.1e}")
    return 0 if spread < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
