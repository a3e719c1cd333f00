"""The planner (``python -m panda.plan``) against measurements on this CPU.

    python benchmarks/plan_vs_measured.py

For models of increasing size (LLaMA 128 -> 1024 wide, 4 -> 12 layers; a tiny and a wider STAB;
with and without activation checkpointing; LLM trained or frozen), one process runs real training
steps (forward, backward, AdamW) on fixed-length batches — every sample ``text`` positions with
``frames`` square frames at full resolution, the planner's worst case — and measures the peak of
live tensor memory during the second step.

How it is measured, and why that is fair: the PyTorch profiler's memory events record every
allocation and free of the CPU allocator (the bytes each tensor takes, as ``torch.cuda``'s
``max_memory_allocated`` counts them on a GPU); the peak of their running sum during the step,
plus what is alive when the step starts (parameters and AdamW's moments, gradients set to None),
is the step's peak. RSS would add the allocator's caching and fragmentation, which a GPU's
allocator has too but differently; the planner predicts tensor bytes, so tensor bytes are measured.

The same process prints the planner's prediction for each point and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from panda.constants import IMAGE_PLACEHOLDER_ID
from panda.paths import config_dir
VOCAB = 8192


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from panda.config import register_configs, to_train_config

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return to_train_config(hydra_compose(config_name="train", overrides=list(overrides)))


def build(cfg, vocab: int = VOCAB):
    from panda.build import enable_activation_checkpointing
    from panda.models.video_lm import VideoLanguageModel, build_llm
    from panda.training.module import apply_stage

    torch.manual_seed(0)
    llm = build_llm(vocab, hidden_size=cfg.llm.hidden_size, layers=cfg.llm.layers, heads=cfg.llm.heads,
                    intermediate_size=cfg.llm.intermediate_size, max_position_embeddings=8192)
    model = VideoLanguageModel(cfg.stab, llm, projector=cfg.model.projector)
    from panda.models.adapters import apply_adapter

    apply_adapter(llm, cfg.llm)
    apply_stage(model, cfg.stage)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model.llm)
    return model.train()


def batch(cfg, text: int, vocab: int = VOCAB, supervised: int | None = None) -> dict:
    """``text`` positions per sample (BOS, the frames' placeholders, then text); the last
    ``supervised`` positions carry labels (default every text position after the frames)."""
    B, F, r = cfg.data.batch_size, cfg.frames, cfg.stab.resolution
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, text), generator=g)
    ids[:, 1:1 + F] = IMAGE_PLACEHOLDER_ID
    labels = ids.clone()
    labels[:, :text - supervised if supervised is not None else 1 + F] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixels": torch.randn(B, F, 3, r, r, generator=g), "frame_mask": torch.ones(B, F, r, r)}


def live_bytes(model, opt) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP2: this rank's shard
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _profiled_peak_mib(fn) -> float:
    """Peak of live tensor bytes allocated inside ``fn``, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def measure(cfg, text: int, vocab: int = VOCAB, supervised: int | None = None, shard=None) -> float:
    model = build(cfg, vocab)
    if shard is not None:
        shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = training_step(model, opt, batch(cfg, text, vocab, supervised))
    step()  # AdamW's moments exist from here on
    return live_bytes(model, opt) / 2**20 + _profiled_peak_mib(step)


def training_step(model, opt, data: dict):
    """One real step on ``data``: forward, backward, AdamW, gradients freed."""

    def step():
        out = model(data["input_ids"], data["attention_mask"], data["pixels"], data["frame_mask"], data["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _fsdp_rank(rank: int, world: int, port: int, overrides: list, text: int, out) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from panda.training.fsdp import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = compose(overrides)
    mesh = init_device_mesh("cpu", (world,))
    out.put((rank, measure(cfg, text, shard=lambda model: shard_model(model, mesh, cfg.trainer.fsdp))))
    dist.destroy_process_group()


def measure_fsdp(overrides: list, text: int, world: int = 2) -> float:
    """Peak per rank (the larger of the ranks) of the same step under FSDP2 over ``world`` gloo processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_rank, args=(r, world, port, overrides, text, out)) for r in range(world)]
    for p in procs:
        p.start()
    peaks = dict(out.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    return max(peaks.values())


FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.fsdp.param_dtype=null",
        "trainer.fsdp.activation_checkpointing=false"]

POINTS = [  # (label, overrides, text positions)
    ("D128 L4", ["llm.hidden_size=128", "llm.layers=4", "llm.heads=4", "llm.intermediate_size=344"], 256),
    ("D256 L4", ["llm.hidden_size=256", "llm.layers=4", "llm.heads=4", "llm.intermediate_size=688"], 256),
    ("D512 L8", ["llm.hidden_size=512", "llm.layers=8", "llm.heads=8", "llm.intermediate_size=1376"], 256),
    ("D512 L8 ckpt", ["llm.hidden_size=512", "llm.layers=8", "llm.heads=8", "llm.intermediate_size=1376",
                      "model.gradient_checkpointing=true"], 256),
    ("D512 L8 frozen LLM", ["llm.hidden_size=512", "llm.layers=8", "llm.heads=8", "llm.intermediate_size=1376",
                            "stage=prealign"], 256),
    ("D512 L8 LoRA r16", ["llm.hidden_size=512", "llm.layers=8", "llm.heads=8", "llm.intermediate_size=1376",
                          "llm.adapter=lora", "llm.lora.dropout=0.0"], 256),
    ("D1024 L12", ["llm.hidden_size=1024", "llm.layers=12", "llm.heads=16", "llm.intermediate_size=2752"], 384),
    ("D1024 L12 ckpt", ["llm.hidden_size=1024", "llm.layers=12", "llm.heads=16", "llm.intermediate_size=2752",
                        "model.gradient_checkpointing=true"], 384),
    ("D512 L8 STAB w128 224px", ["llm.hidden_size=512", "llm.layers=8", "llm.heads=8", "llm.intermediate_size=1376",
                                 "stab.width=128", "stab.heads=4", "stab.resolution=224"], 512),
]
FSDP_POINTS = [
    ("FSDP2 x2 D512 L8", FSDP + ["llm.hidden_size=512", "llm.layers=8", "llm.heads=8", "llm.intermediate_size=1376"], 256),
    ("FSDP2 x2 D1024 L12", FSDP + ["llm.hidden_size=1024", "llm.layers=12", "llm.heads=16",
                                   "llm.intermediate_size=2752"], 384),
]
COMMON = ["data.root=/nonexistent", "data.synthetic=null", "data.batch_size=2", "frames=4", "trainer=cpu",
          "stab=tiny", "stab.width=64", "stab.heads=4", "stab.resolution=112"]


def main(argv=None) -> int:
    from panda.plan import plan

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="run the points whose label contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'point':<26} {'params M':>9} {'measured MiB':>13} {'planned MiB':>12} {'planned/measured':>17}")
    worst = 0.0
    for label, overrides, text in POINTS:
        if args.only and args.only not in label:
            continue
        cfg = compose(COMMON + overrides)
        planned = plan(cfg, gpu="cpu", text_tokens=text, vocab=VOCAB).peak_gib * 1024
        measured = measure(cfg, text)
        params = sum(p.numel() for p in build(cfg).parameters()) / 1e6
        ratio = planned / measured
        worst = max(worst, abs(ratio - 1))
        print(f"{label:<26} {params:9.1f} {measured:13.1f} {planned:12.1f} {ratio:17.3f}", flush=True)
    for label, overrides, text in FSDP_POINTS:
        if args.only and args.only not in label:
            continue
        cfg = compose(COMMON + overrides)
        planned = plan(cfg, gpu="cpu", text_tokens=text, vocab=VOCAB).peak_gib * 1024
        measured = measure_fsdp(COMMON + overrides, text)
        params = sum(p.numel() for p in build(cfg).parameters()) / 1e6
        ratio = planned / measured
        worst = max(worst, abs(ratio - 1))
        print(f"{label:<26} {params:9.1f} {measured:13.1f} {planned:12.1f} {ratio:17.3f}", flush=True)
    print(f"largest deviation: {worst:.1%} (goal: within 15%)")
    logits_saving(args.only)
    hidden_states_saving(args.only)
    return 0


def hidden_states_saving(only: str | None) -> None:
    """The distillation head's hidden states: the picked layers only (stride 4: 3 of 9 here) vs all
    L + 1, for a training step (forward + backward) and a no-grad forward (validation), D512 L8."""
    if only and only not in "hidden":
        return
    from panda.models.distill import DistillConfig, TeacherFeatures
    from panda.models.video_lm import VideoLanguageModel, build_llm

    cfg = compose(COMMON + ["llm.hidden_size=512", "llm.layers=8", "llm.heads=8", "llm.intermediate_size=1376"])
    text = 512
    torch.manual_seed(0)
    llm = build_llm(VOCAB, hidden_size=512, layers=8, heads=8, intermediate_size=1376, max_position_embeddings=8192)
    model = VideoLanguageModel(cfg.stab, llm, distill=DistillConfig(), teacher_width=256).train()
    data = batch(cfg, text)
    B, F = cfg.data.batch_size, cfg.frames
    teacher = TeacherFeatures(torch.randn(B * F, 8, 8, 256), torch.ones(B * F, 8, 8, dtype=torch.bool))
    args = (data["input_ids"], data["attention_mask"], data["pixels"], data["frame_mask"], data["labels"])
    decoder = getattr(model.llm, model.llm.base_model_prefix)
    original = decoder.forward

    def train_step():
        model(*args, teacher=teacher).loss.backward()
        model.zero_grad(set_to_none=True)

    def no_grad_forward():
        with torch.no_grad():
            model(*args, teacher=teacher)

    rows = []
    for name, fn in (("training step", train_step), ("no-grad forward", no_grad_forward)):
        fn()  # warm-up
        picked = _profiled_peak_mib(fn)
        decoder.forward = lambda *a, **k: original(*a, **{**k, "output_hidden_states": True})  # the baseline: all
        try:
            everything = _profiled_peak_mib(fn)
        finally:
            decoder.forward = original
        rows.append((name, everything, picked))
    print(f"\nHidden states for the distillation head (D512 L8, {len(model.distill_head.layers)} of 9 read, "
          f"2 x {text} text positions + {F} frames):")
    for name, everything, picked in rows:
        print(f"  {name:<16} all kept {everything:8.1f} MiB, picked only {picked:8.1f} MiB: "
              f"{everything - picked:7.1f} MiB saved ({picked / everything:.3f} x)")


def logits_saving(only: str | None) -> None:
    """The LM head at supervised positions only vs at every position (the LLM's own loss), measured
    at a mid size with a LLaMA-sized vocabulary and answers of 32 tokens per sample."""
    if only and only not in "logits":
        return
    import panda.models.video_lm as video_lm

    cfg = compose(COMMON + ["llm.hidden_size=512", "llm.layers=8", "llm.heads=8", "llm.intermediate_size=1376"])
    text, vocab, answer = 512, 32000, 32
    supervised = measure(cfg, text, vocab, answer)
    original = video_lm.supervised_head_supported
    video_lm.supervised_head_supported = lambda llm: False  # the baseline: logits of every position
    try:
        everywhere = measure(cfg, text, vocab, answer)
    finally:
        video_lm.supervised_head_supported = original
    print(f"\nLM head at supervised positions (D512 L8, vocab 32000, 2 x {text} positions, {answer} answer tokens each):")
    print(f"  every position {everywhere:.1f} MiB, supervised only {supervised:.1f} MiB: "
          f"{everywhere - supervised:.1f} MiB saved ({supervised / everywhere:.3f} x)")


if __name__ == "__main__":
    sys.exit(main())
