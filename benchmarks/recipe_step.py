"""Parameter counts at the release sizes, and the cost of one stage-3 training step at tiny size.

    python benchmarks/recipe_step.py

Counts: STAB, projector and distillation head at d=1024 / D=4096 (32-layer LLM, teacher width
1024), and the 7B LLaMA (built on the meta device: nothing is allocated). Timing: forward +
backward + AdamW of a stage-3 step (everything trains) on 4 videos x 4 frames at 112 px, median
of N steps, in one process: LM loss only (the baseline), + distillation (tiny LanguageBind teacher
and head), + distillation with activation checkpointing of the LLM.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from panda.models.distill import DistillationHead
from panda.models.stab import STAB, STABConfig, build_projector, count_parameters


def release_counts() -> dict[str, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    stab = STAB(STABConfig())
    projector = build_projector("mlp2x_gelu", 1024, 4096)
    head = DistillationHead(4096, 32, 1024, layer_stride=4, heads=8)
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                           intermediate_size=11008, tie_word_embeddings=False))
        from panda.models.teachers import LanguageBindVideoTeacher, TeacherConfig

        teacher = LanguageBindVideoTeacher(TeacherConfig(kind="languagebind_video", random_init=True))
    counts = {"stab": count_parameters(stab), "projector": count_parameters(projector),
              "distill_head": count_parameters(head), "llm_7b": count_parameters(llm),
              "teacher (frozen)": count_parameters(teacher)}
    counts["stab+projector"] = counts["stab"] + counts["projector"]
    return counts


def tiny_step_times(steps: int, threads: int) -> dict[str, float]:
    from panda.models.distill import DistillConfig
    from panda.models.teachers import LanguageBindVideoTeacher, TeacherConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    B, Fr, text = 4, 4, 48
    pixels = torch.randn(B, Fr, 3, 112, 112)
    mask = torch.ones(B, Fr, 112, 112)
    teacher_pixels, teacher_mask = torch.nn.functional.avg_pool2d(pixels.flatten(0, 1), 2).view(B, Fr, 3, 56, 56), torch.ones(B, Fr, 56, 56)
    ids = torch.randint(3, 400, (B, text))
    ids[:, 1 : 1 + Fr] = -200  # one placeholder per frame
    labels = ids.clone()
    labels[:, : 1 + Fr] = -100
    attn = torch.ones_like(ids)
    teacher = LanguageBindVideoTeacher(TeacherConfig(kind="languagebind_video", random_init=True, width=32, layers=2, heads=4,
                                                     intermediate_size=64, image_size=56, patch_size=14), group=4).freeze()

    def build(distil: bool, checkpointing: bool):
        torch.manual_seed(0)
        llm = build_llm(400, hidden_size=64, layers=2, heads=4, intermediate_size=256)
        if checkpointing:
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model = VideoLanguageModel(STABConfig(width=64, heads=4, resolution=112, dropout=0.0), llm,
                                   distill=DistillConfig(layer_stride=1, heads=4) if distil else None,
                                   teacher_width=32 if distil else None).train()
        return model, torch.optim.AdamW(model.parameters(), lr=2e-5)

    results = {}
    for name, distil, ckpt in [("lm_only", False, False), ("lm+distill", True, False), ("lm+distill+checkpointing", True, True)]:
        model, opt = build(distil, ckpt)
        times = []
        for i in range(steps + 3):
            start = time.perf_counter()
            feats = teacher(teacher_pixels, teacher_mask) if distil else None
            out = model(ids, attn, pixels, mask, labels, teacher=feats)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 3:  # warm-up steps are not counted
                times.append(time.perf_counter() - start)
        results[name] = statistics.median(times) * 1000
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    counts = release_counts()
    print("parameters at release sizes (d=1024, D=4096, 32 layers, teacher width 1024):")
    for k, v in counts.items():
        print(f"  {k:<16} {v:>14,d}")
    print(f"\nstage-3 step at tiny size (4 videos x 4 frames x 112 px, {args.threads} CPU threads, median of {args.steps}):")
    times = tiny_step_times(args.steps, args.threads)
    base = times["lm_only"]
    for k, v in times.items():
        print(f"  {k:<26} {v:8.1f} ms   x{v / base:.2f} vs lm_only")


if __name__ == "__main__":
    main()
