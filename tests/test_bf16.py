"""bf16 end to end on the CPU, each run against the same run in fp32 (same seed, same batches):

- one process with Lightning's autocast (``trainer.precision=bf16-mixed``): the tiny default's loss
  curve over 200 steps, bf16 matmuls with fp32 master weights and gradients, exact resume; and the
  7B recipe's stage 1 precision (autocast, the frozen LLM and the teacher stored in bf16, distillation);
- FSDP2 over 2 gloo processes with bf16 compute, fp32 master weights and fp32 gradient reduction
  (``trainer=fsdp trainer.fsdp.param_dtype=bfloat16 trainer.fsdp.reduce_dtype=float32``, the 7B
  recipe's stages 2 and 3, with distillation from a bf16 teacher): loss curve, dtypes, exact resume.

What each run computed in is recorded by tests/dtype_probe.py (forward hooks, an optimiser step
hook, FSDP2's collectives). bf16 rounding makes the curves drift apart slowly, so the loss checks
are tolerances set from measured gaps with margin (the comments say what was measured, on this
2-core CPU; docs/benchmarks.md has the numbers).
"""

import json
import math

import pytest
import torch
from conftest import run_cli, tiny_overrides, train_tiny
from dtype_probe import DtypeProbe

# distillation from the toy teacher (the recipe's teacher is LanguageBind's, also frozen)
DISTILL = ["teacher=tiny_languagebind", "distill.layer_stride=1", "distill.heads=4", "model.gradient_checkpointing=true"]


def _losses(summary: dict) -> list[float]:
    return [loss for _, loss in summary["train/loss_by_step"]]


def _mean(values) -> float:
    return sum(values) / len(values)


def _window_gaps(reference: list[float], other: list[float], width: int) -> list[float]:
    """Relative gap of ``other``'s mean to ``reference``'s, per window of ``width`` steps."""
    return [_mean(other[i:i + width]) / _mean(reference[i:i + width]) - 1 for i in range(0, len(reference), width)]


def _tracking_gaps(fp32: dict, bf16: dict, steps: int, width: int, label: str):
    """The two runs' per-step losses (``steps`` each, all finite) and bf16's relative gap to fp32 per
    window of ``width`` steps, printed under ``label``: (fp32 losses, bf16 losses, gaps)."""
    ref, run = _losses(fp32), _losses(bf16)
    assert len(ref) == len(run) == steps
    assert all(math.isfinite(x) for x in ref + run)
    gaps = _window_gaps(ref, run, width)
    print(f"{label}, {width}-step window means:", " ".join(f"{g:+.2%}" for g in gaps),
          f"| last {width} steps {_mean(ref[-width:]):.4f} / {_mean(run[-width:]):.4f}")
    return ref, run, gaps


def _probed_train(root, run_dir, *overrides) -> tuple[dict, dict]:
    """An in-process tiny run with a DtypeProbe on its model: (summary, the dtypes its training used)."""
    import panda.training.run as run

    build, probe = run.build_model, DtypeProbe()

    def build_and_attach(*args, **kwargs):
        model = build(*args, **kwargs)
        probe.attach(model)
        return model

    run.build_model = build_and_attach
    try:
        summary = train_tiny(root, run_dir, *overrides)
    finally:
        run.build_model = build
        probe.detach()
    return summary, probe.as_json()


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_distillation_loss_is_computed_in_fp32_from_bf16_predictions(loss):
    from panda.models.distill import frame_distillation_losses

    torch.manual_seed(0)
    pred = torch.randn(2, 4, 4, 8).bfloat16().requires_grad_()  # the head's output under bf16 compute
    teacher = torch.randn(2, 8, 8, 8)  # fp32 features on a finer grid (pooled to the prediction's)
    out = frame_distillation_losses(pred, teacher, loss)
    # neither the teacher's features nor the loss are rounded to bf16 (as the LM loss: logits.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, frame_distillation_losses(pred.detach().float(), teacher, loss), rtol=0, atol=0)
    out.sum().backward()
    assert pred.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------ one process, bf16-mixed autocast

STEPS = 120  # the tiny model goes from loss ~6 to below 1 at this learning rate
RESUME_AT = 100  # a periodic checkpoint the bf16 run is resumed from
COMMON = [f"trainer.max_steps={STEPS}", "trainer.max_epochs=1000", "stage.lr=3e-3",
          f"trainer.checkpoint_every_n_steps={RESUME_AT}"]
# Measured here, 20-step window means of bf16-mixed against fp32: seed 42 (this test) within 0.3% up
# to step 120, then -1.8%, -0.3%, +2.1%, last 20 steps +1.0%. Seeds 0, 1 and 2: within 0.1% up to
# step 100, then drifting apart as bf16 rounding compounds, up to 12.4% (seed 0, steps 141-160);
# last 20 steps -2.1% to +9.5% (200-step runs; this test runs 120 to keep the suite short).
# Tolerances: 1% up to step 60, 25% for the last 20 steps.
EARLY_STEPS, EARLY_TOL = 60, 0.01
LAST_TOL = 0.25


@pytest.fixture(scope="module")
def autocast_runs(synthetic_root, tmp_path_factory):
    """The tiny default trained in fp32 and in bf16-mixed: for each its summary, dtypes and run dir."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        run_dir = tmp_path_factory.mktemp(precision)
        summary, seen = _probed_train(synthetic_root, run_dir, f"trainer.precision={precision}", *COMMON)
        runs[precision] = {"summary": summary, "seen": seen, "run_dir": run_dir}
    return runs


def test_bf16_mixed_loss_tracks_fp32_and_stays_finite(autocast_runs):
    fp32, bf16 = (autocast_runs[p]["summary"] for p in ("32-true", "bf16-mixed"))
    ref, run, gaps = _tracking_gaps(fp32, bf16, STEPS, 20, "bf16-mixed vs fp32")
    assert all(abs(g) < EARLY_TOL for g in gaps[:EARLY_STEPS // 20]), gaps
    assert abs(gaps[-1]) < LAST_TOL, gaps
    assert ref != run  # bf16 really changed the arithmetic
    assert _mean(run[-20:]) < 0.2 * run[0]  # it learned (loss ~6 -> ~0.3)
    # the held-out questions (6, answered after training, without autocast) come out as fp32's, up to one
    assert bf16["eval/judged"] == fp32["eval/judged"] == 6
    assert bf16["eval/accuracy"] > 0 and abs(bf16["eval/accuracy"] - fp32["eval/accuracy"]) <= 1 / 6 + 1e-9


def test_bf16_mixed_runs_matmuls_in_bf16_and_keeps_fp32_master_weights(autocast_runs):
    fp32, bf16 = autocast_runs["32-true"]["seen"], autocast_runs["bf16-mixed"]["seen"]
    # autocast: the LLM's and STAB's matmuls produce bf16 from the fp32 stored weights; STAB's batch
    # norm takes and gives bf16 with fp32 weights and running statistics; the LM loss is fp32
    for key in ("llm_output", "stab_output", "batch_norm_input", "batch_norm_output"):
        assert bf16[key] == ["bfloat16"], (key, bf16)
    for key in ("llm_weight", "stab_weight", "batch_norm_weight", "lm_loss", "loss", "param", "grad"):
        assert bf16[key] == ["float32"], (key, bf16)
    assert all(v == ["float32"] for v in fp32.values()), fp32  # the same probe sees only fp32 without autocast
    # the checkpoint: fp32 weights and fp32 optimiser state
    ckpt = torch.load(autocast_runs["bf16-mixed"]["summary"]["checkpoint"], weights_only=False)
    weights = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    moments = [v for s in ckpt["optimizer_states"][0]["state"].values() for k, v in s.items() if k != "step"]
    assert weights and moments and {v.dtype for v in weights + moments} == {torch.float32}


def test_bf16_mixed_resumes_exactly(autocast_runs, synthetic_root, tmp_path):
    straight = autocast_runs["bf16-mixed"]
    periodic = straight["run_dir"] / "checkpoints" / f"step{RESUME_AT:06d}.ckpt"
    resumed = train_tiny(synthetic_root, tmp_path, "trainer.precision=bf16-mixed", *COMMON, f"resume={periodic}",
                         "evaluate=false")
    # steps 1-100 come back with the checkpoint, 101-120 are trained again: the same losses, bit for bit
    assert resumed["train/loss_by_step"] == straight["summary"]["train/loss_by_step"]


# Measured here (seed 42, 60 steps): 10-step window means of the stage-1 precision against fp32
# within 0.1%. Tolerance: 1%.
STAGE1_STEPS, STAGE1_TOL = 60, 0.01


def test_stage1_precision_frozen_llm_and_teacher_in_bf16_with_distillation_tracks_fp32(synthetic_root, tmp_path):
    common = ["stage=prealign", *DISTILL, f"trainer.max_steps={STAGE1_STEPS}", "trainer.max_epochs=1000",
              "stage.lr=3e-3", "evaluate=false"]
    fp32, fp32_seen = _probed_train(synthetic_root, tmp_path / "fp32", *common)
    # conf/experiment/videopanda_7b/stage1_prealign.yaml's precision settings
    bf16, seen = _probed_train(synthetic_root, tmp_path / "bf16", *common, "trainer.precision=bf16-mixed",
                               "llm.dtype=bfloat16", "teacher.dtype=bfloat16")
    ref, run, gaps = _tracking_gaps(fp32, bf16, STAGE1_STEPS, 10, "stage-1 precision vs fp32")
    assert all(abs(g) < STAGE1_TOL for g in gaps), gaps
    assert ref != run
    for key in ("llm_weight", "llm_output", "stab_output"):  # the frozen LLM is stored and computes in bf16
        assert seen[key] == ["bfloat16"], (key, seen)
    # the trained parts (STAB, projector, distillation head) keep fp32 weights and gradients; the losses are fp32
    for key in ("stab_weight", "param", "grad", "lm_loss", "distill_loss", "loss"):
        assert seen[key] == ["float32"], (key, seen)
    assert fp32_seen["distill_loss"] == ["float32"]
    state = torch.load(bf16["checkpoint"], weights_only=False)["state_dict"]
    floating = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    assert {k.startswith("model.llm.") for k in floating} == {True, False}
    for key, dtype in floating.items():  # the checkpoint: the LLM in bf16, the trained parts in fp32
        assert dtype == (torch.bfloat16 if key.startswith("model.llm.") else torch.float32), key


# ------------------------------------------------------------------ FSDP2 over 2 gloo processes

FSDP_STEPS = 20  # exact resume of a sharded checkpoint is tests/test_scale.py's
FSDP_COMMON = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.max_steps={FSDP_STEPS}",
               "trainer.max_epochs=1000", "stage.lr=3e-3", "evaluate=false", *DISTILL]
# conf/experiment/videopanda_7b/stage2_pretrain.yaml and stage3_finetune.yaml's precision settings
FSDP_BF16 = ["trainer.fsdp.param_dtype=bfloat16", "trainer.fsdp.reduce_dtype=float32", "teacher.dtype=bfloat16"]
# Measured here (seed 42, 40 steps, with distillation): 10-step window means of bf16 and fp32 within
# 0.12% (without distillation, 60 steps: within 0.17%); this test runs the first 20. Tolerance: 2% per window.
FSDP_TOL = 0.02


def _fsdp_run(root, run_dir, probe_dir, *extra) -> tuple[dict, list[dict]]:
    """train.py under tests/dtype_probe.py (every rank records its dtypes): its summary and the ranks' records."""
    run_cli(["tests/dtype_probe.py", *FSDP_COMMON, f"hydra.run.dir={run_dir}", *tiny_overrides(root), *extra],
            env={"DTYPE_PROBE_OUT": str(probe_dir)})
    seen = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    return json.loads((run_dir / "summary.json").read_text()), seen


def _checkpoint_dtypes(folder) -> set[torch.dtype]:
    """The dtypes of the floating-point tensors of a sharded (distributed) checkpoint, from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {m.properties.dtype for m in meta.values()
            if isinstance(m, TensorStorageMetadata) and m.properties.dtype.is_floating_point}


@pytest.mark.slow
def test_fsdp_bf16_compute_with_fp32_master_weights_and_reduction_tracks_fp32(synthetic_root, tmp_path):
    fp32, fp32_seen = _fsdp_run(synthetic_root, tmp_path / "fp32", tmp_path / "fp32_probe", "trainer.fsdp.param_dtype=null")
    bf16, bf16_seen = _fsdp_run(synthetic_root, tmp_path / "bf16", tmp_path / "bf16_probe", *FSDP_BF16)
    ref, run, gaps = _tracking_gaps(fp32, bf16, FSDP_STEPS, 10, "FSDP2 bf16 vs fp32")
    assert all(abs(g) < FSDP_TOL for g in gaps), gaps
    assert ref != run  # bf16 really changed the arithmetic
    for seen in bf16_seen:  # each rank
        # the decoder layers and STAB compute with bf16 copies of their weights, all-gathered in bf16
        for key in ("llm_weight", "llm_output", "stab_weight", "stab_output", "batch_norm_output"):
            assert seen[key] == ["bfloat16"], (key, seen)
        assert "bfloat16" in seen["all_gather"]
        # batch norm's own unit computes in fp32; gradients are reduce-scattered in fp32; the sharded
        # parameters the optimiser steps (master weights) and their gradients are fp32; the losses are fp32
        for key in ("batch_norm_weight", "batch_norm_input", "reduce_scatter", "param", "grad", "lm_loss",
                    "distill_loss", "loss"):
            assert seen[key] == ["float32"], (key, seen)
    for seen in fp32_seen:  # the same probe sees only fp32 in the fp32 run
        assert all(v == ["float32"] for v in seen.values()), seen
    for run_dir in ("fp32", "bf16"):  # the sharded checkpoints hold fp32 weights and optimiser state
        assert _checkpoint_dtypes(tmp_path / run_dir / "checkpoints" / "last.ckpt") == {torch.float32}
