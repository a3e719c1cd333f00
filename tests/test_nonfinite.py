"""The non-finite step guard (``trainer.max_nonfinite_steps``, panda/training/nonfinite.py): a step
whose loss or gradient norm is NaN/inf is skipped on every rank without a trace, counted and named;
N in a row stop the run with a checkpoint of the last finite state and a non-zero exit."""

import copy
import csv
import json
import math
import os
import re
import textwrap
import types

import pytest
import torch

from conftest import run_cli, tiny_overrides, train_tiny
from panda.training.module import PandaModule
from panda.training.nonfinite import NonFiniteStepsError

# The test double, also a plugin module of a train.py run (plugins=[nonfinite_inject]): at chosen
# optimiser steps on one rank it turns a training batch's pixels into NaN ("nan": the loss and every
# gradient become NaN), or reports a finite step as non-finite to the guard ("force": a skip of a
# finite batch by the guard's own mechanism, the reference a NaN batch's skip must equal).
PLUGIN = textwrap.dedent('''
    import json
    import os

    import torch

    from panda.training.module import PandaModule
    from panda.training.nonfinite import NonFiniteGuard


    def install(setattr_, nan=(), force=(), rank=0, record=None):
        training_step, local_flag = PandaModule.training_step, NonFiniteGuard.local_flag

        def corrupting_step(self, batch, batch_idx):
            step = self.trainer.global_step + 1
            if step in nan and self.global_rank == rank:
                batch["pixels"] = torch.full_like(batch["pixels"], float("nan"))
                if record is not None:
                    record(step, batch["ids"])
            return training_step(self, batch, batch_idx)

        def forced_flag(self, module, optimizer):
            flag = local_flag(self, module, optimizer)
            forced = module.trainer.global_step + 1 in force and module.global_rank == rank
            return torch.ones_like(flag) if forced else flag

        setattr_(PandaModule, "training_step", corrupting_step)
        setattr_(NonFiniteGuard, "local_flag", forced_flag)


    if os.environ.get("NONFINITE_TEST"):  # a train.py run (every rank imports the plugin)
        spec = json.loads(os.environ["NONFINITE_TEST"])

        def to_file(step, ids):
            with open(spec["record"], "a") as f:
                f.write(json.dumps({"step": step, "ids": ids}) + "\\n")

        install(setattr, spec.get("nan", []), spec.get("force", []), spec.get("rank", 0), to_file)
''')

# fixed learning rate: a run cut short at step k holds the weights a longer run had after step k
CONSTANT_LR = ["stage.schedule=constant", "stage.warmup_ratio=0"]


def inject(monkeypatch, nan=(), force=(), rank=0) -> dict:
    """In this process: the plugin's patches (undone after the test); returns {step: ids} of the
    corrupted micro-batches."""
    module = types.ModuleType("nonfinite_inject")
    exec(PLUGIN, module.__dict__)
    corrupted = {}
    module.install(monkeypatch.setattr, nan, force, rank, lambda step, ids: corrupted.setdefault(step, []).extend(ids))
    return corrupted


def snapshot_after(monkeypatch, steps) -> dict:
    """{step: (module state, optimiser state)} right after the optimiser step of each of ``steps``."""
    taken = {}
    original = PandaModule.optimizer_step

    def snapshotting(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        original(self, epoch, batch_idx, optimizer, optimizer_closure)
        step = self.trainer.global_step + 1
        if step in steps:
            taken[step] = ({k: v.detach().clone() for k, v in self.state_dict().items()},
                           copy.deepcopy(optimizer.optimizer.state_dict()))

    monkeypatch.setattr(PandaModule, "optimizer_step", snapshotting)
    return taken


def same(a, b) -> bool:
    """Nested dicts/lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def checkpoint(run_dir) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_nan_batch_is_skipped_without_a_trace(synthetic_root, tmp_path, monkeypatch, caplog, accumulation):
    """Step 3's batches are NaN: that step changes no weight, no batch-norm statistic and no optimiser
    state; the run goes on and ends where a run whose step 3 the guard skipped on a finite batch ends."""
    corrupted = inject(monkeypatch, nan=[3])
    states = snapshot_after(monkeypatch, [2, 3])
    run = ["trainer.max_steps=6", "evaluate=false", "logger=csv", "trainer.log_every_n_steps=1",
           f"trainer.accumulate_grad_batches={accumulation}"]
    summary = train_tiny(synthetic_root, tmp_path / "nan", *run)
    (model_2, optim_2), (model_3, optim_3) = states[2], states[3]
    assert same(model_2, model_3)  # weights and batch-norm statistics
    assert same(optim_2["state"], optim_3["state"])  # Adam's moments and step counts (the learning rate moved on)
    assert any("running_mean" in k for k in model_3)  # STAB's batch norms are among them
    final = checkpoint(tmp_path / "nan")
    assert all_finite(final["state_dict"]) and not same(final["state_dict"], model_3)  # it trained on after
    assert summary["train/steps"] == 6 and summary["train/nonfinite_steps"] == 1
    losses = dict(summary["train/loss_by_step"])
    assert math.isnan(losses[3]) and math.isfinite(summary["train/loss_final"])
    with open(tmp_path / "nan" / "csv" / "metrics.csv") as f:
        logged = [row["train/nonfinite_steps"] for row in csv.DictReader(f) if row.get("train/nonfinite_steps")]
    assert [float(v) for v in logged] == [0, 0, 1, 1, 1, 1]
    [warning] = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(corrupted[3]) == 4 * accumulation  # every micro-batch of the step, each named
    assert warning.startswith(f"non-finite loss at step 3 (samples {', '.join(corrupted[3])}): optimiser step skipped")

    monkeypatch.undo()
    inject(monkeypatch, force=[3])  # the same step skipped by the guard, its batch finite
    train_tiny(synthetic_root, tmp_path / "forced", *run)
    reference = checkpoint(tmp_path / "forced")
    assert same(final["state_dict"], reference["state_dict"])
    assert same(final["optimizer_states"], reference["optimizer_states"])
    assert final["lr_schedulers"] == reference["lr_schedulers"]  # the skipped step counted for the schedule


def test_max_nonfinite_steps_in_a_row_stop_the_run_with_the_last_finite_state(synthetic_root, tmp_path, monkeypatch):
    """Steps 2, 4, 5, 6 are NaN: 2 alone is skipped, 4-6 (3 in a row) stop the run. Its checkpoint
    holds the state after step 3, exactly that of the same run ending at step 3."""
    corrupted = inject(monkeypatch, nan=[2, 4, 5, 6])
    with pytest.raises(NonFiniteStepsError) as stop:
        train_tiny(synthetic_root, tmp_path / "stop", "trainer.max_steps=10", "evaluate=false", *CONSTANT_LR)
    message = str(stop.value)
    path = str(tmp_path / "stop" / "checkpoints" / "last.ckpt")
    assert "\n" not in message and message.startswith(
        "3 optimiser steps in a row had a non-finite loss or gradient norm and were skipped "
        f"(trainer.max_nonfinite_steps=3): step 4 (loss; samples {', '.join(corrupted[4])}); step 5 ")
    assert f"Stopped; {path} holds the last finite weights (those after step 3)" in message
    assert all(i in message for i in corrupted[6]) and "lower the learning rate (stage.lr=0.001)" in message
    assert message.endswith("; trainer.precision is 32-true already")
    stopped = checkpoint(tmp_path / "stop")
    assert stopped["global_step"] == 6 and all_finite(stopped["state_dict"])
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["train/nonfinite_steps"] == 4 and summary["checkpoint"] == path
    marker = json.loads((tmp_path / "stop" / "checkpoints" / "complete.json").read_text())
    assert marker["file"] == "last.ckpt" and marker["finished"] is False

    train_tiny(synthetic_root, tmp_path / "short", "trainer.max_steps=3", "evaluate=false", *CONSTANT_LR)
    reference = checkpoint(tmp_path / "short")
    assert same(stopped["state_dict"], reference["state_dict"])
    assert same(stopped["optimizer_states"], reference["optimizer_states"])

    # resumed, the run continues after the bad batches; the checkpoint carried the count
    resumed = train_tiny(synthetic_root, tmp_path / "stop", "trainer.max_steps=8", "evaluate=false", *CONSTANT_LR,
                         "resume=last")
    assert resumed["train/steps"] == 8 and resumed["train/nonfinite_steps"] == 4 and "status" not in resumed


def test_on_finite_data_the_guard_changes_nothing(synthetic_root, tmp_path):
    """The guard's own step (closure, check, then Lightning's clipping and update) trains to the bit
    what Lightning's step does (trainer.max_nonfinite_steps=0), with gradient accumulation too."""
    run = ["trainer.max_steps=3", "evaluate=false", "trainer.accumulate_grad_batches=2"]
    guarded = train_tiny(synthetic_root, tmp_path / "guarded", *run)
    plain = train_tiny(synthetic_root, tmp_path / "plain", *run, "trainer.max_nonfinite_steps=0")
    assert guarded["train/nonfinite_steps"] == 0 and guarded["train/loss_by_step"] == plain["train/loss_by_step"]
    a, b = checkpoint(tmp_path / "guarded"), checkpoint(tmp_path / "plain")
    assert same(a["state_dict"], b["state_dict"]) and same(a["optimizer_states"], b["optimizer_states"])


def test_max_nonfinite_steps_0_turns_the_guard_off(synthetic_root, tmp_path, monkeypatch):
    """Without the guard one NaN batch writes NaN into the weights (what the guard is for)."""
    inject(monkeypatch, nan=[2])
    summary = train_tiny(synthetic_root, tmp_path, "trainer.max_steps=3", "evaluate=false", "trainer.max_nonfinite_steps=0")
    assert summary["train/nonfinite_steps"] is None
    assert not all_finite(checkpoint(tmp_path)["state_dict"])


def test_with_a_gradient_scaler_only_the_loss_counts():
    """16-mixed: an inf gradient is the scaler's (it skips that step and lowers the scale); a
    non-finite loss is the guard's. Without a scaler both count."""
    from types import SimpleNamespace

    from panda.training.nonfinite import NonFiniteGuard

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    for scaler, loss, grad, skipped in [(None, 1.0, math.inf, True), (None, math.nan, 0.0, True), (None, 1.0, 0.0, False),
                                        (object(), 1.0, math.inf, False), (object(), math.inf, 0.0, True)]:
        module = SimpleNamespace(device=torch.device("cpu"),
                                 trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), world_size=1))
        guard = NonFiniteGuard(3)
        guard.record(torch.tensor(loss), ["a"])
        param.grad = torch.full((3,), grad)
        assert guard.should_skip(module, optimizer) is skipped, (scaler, loss, grad)


def test_the_stop_message_names_steps_samples_by_rank_and_the_precision_to_try():
    from panda.training.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(2)
    guard.bad_steps = [{"step": 1, "what": "loss", "samples": {1: [f"v{i}" for i in range(10)]}},
                       {"step": 2, "what": "gradient norm", "samples": {0: ["a", "b"], 1: ["c"]}}]
    message = guard.stop_message("run/checkpoints/last.ckpt", 2e-5, "bf16-mixed")
    assert "step 1 (loss; samples rank 1: v0, v1, v2, v3, v4, v5, v6, v7 and 2 more); " \
           "step 2 (gradient norm; samples rank 0: a, b; rank 1: c). " in message
    assert "run/checkpoints/last.ckpt holds the last finite weights (the initial weights)" in message
    assert message.endswith("lower the learning rate (stage.lr=2e-05), or train at trainer.precision=32-true "
                            "(now bf16-mixed; fp16/bf16 overflow)")


def test_the_guard_reads_one_flag_per_optimiser_step_not_per_micro_batch(synthetic_root, tmp_path):
    """The sync audit (trainer.audit_syncs) with 2 micro-batches per optimiser step: the guard's one
    read (should_skip) in each step's last micro-batch, none in the others, nothing else of its own."""
    train_tiny(synthetic_root, tmp_path, "trainer.audit_syncs=true", "trainer.accumulate_grad_batches=2",
               "trainer.max_steps=3", "trainer.log_every_n_steps=100", "evaluate=false")
    micro = json.loads((tmp_path / "syncs.json").read_text())["micro_batches"]
    assert [e["step"] for e in micro] == [0, 1, 1, 2, 2, 3]
    for i, entry in enumerate(micro):
        guard = {re.sub(r":\d+ ", " ", site): n for site, n in entry["sites"].items()  # without the line number
                 if "panda/training/nonfinite.py" in site}
        closes_a_step = i % 2 == 1
        assert guard == ({"aten::_local_scalar_dense @ panda/training/nonfinite.py (should_skip)": 1} if closes_a_step else {})


FSDP_TWO_CPU = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.fsdp.param_dtype=null",
                "logger=none", "evaluate=false", "plugins=[nonfinite_inject]"]


def _fsdp_run(root, tmp_path, name, spec, *extra, check=True):
    (tmp_path / "nonfinite_inject.py").write_text(PLUGIN)
    spec = {**spec, "record": str(tmp_path / f"{name}.jsonl")}
    env = {"PYTHONPATH": str(tmp_path), "NONFINITE_TEST": json.dumps(spec)}
    run_dir = tmp_path / name
    proc = run_cli(["train.py", *tiny_overrides(root), *FSDP_TWO_CPU, *extra, f"hydra.run.dir={run_dir}"],
                   env=env, check=check)
    return proc, run_dir


@pytest.mark.slow
def test_fsdp_a_nan_on_one_rank_is_skipped_on_both(synthetic_root, tmp_path):
    """2 gloo processes, FSDP2: step 3's batch is NaN on rank 1 only; both ranks skip it, and the
    weights end as when rank 0 alone reports a finite step 3 as non-finite (both ranks skip)."""
    from panda.models.checkpoints import read_weights

    run = ["trainer.max_steps=5", "export_final=true"]
    proc, nan_dir = _fsdp_run(synthetic_root, tmp_path, "nan", {"nan": [3], "rank": 1}, *run)
    [record] = [json.loads(line) for line in (tmp_path / "nan.jsonl").read_text().splitlines()]
    log = (nan_dir / "train.log").read_text()  # rank 0's log names the samples of every rank
    assert f"non-finite loss at step 3 (samples rank 1: {', '.join(record['ids'])}): optimiser step skipped on every rank" in log
    _, forced_dir = _fsdp_run(synthetic_root, tmp_path, "forced", {"force": [3], "rank": 0}, *run)
    for run_dir in (nan_dir, forced_dir):
        assert json.loads((run_dir / "summary.json").read_text())["train/nonfinite_steps"] == 1
    a, b = read_weights(str(nan_dir / "final")), read_weights(str(forced_dir / "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())


@pytest.mark.slow
def test_fsdp_nonfinite_steps_in_a_row_stop_every_rank_with_exit_code_2(synthetic_root, tmp_path, monkeypatch):
    from panda.export import main as export_main
    from panda.models.checkpoints import read_weights

    proc, run_dir = _fsdp_run(synthetic_root, tmp_path, "stop", {"nan": [2, 3], "rank": 1}, "trainer.max_steps=6",
                              "trainer.max_nonfinite_steps=2", check=False)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert lines and lines[0].startswith("train.py: error: 2 optimiser steps in a row had a non-finite loss")
    records = [json.loads(line) for line in (tmp_path / "stop.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3]
    for r in records:
        assert f"step {r['step']} (loss; samples rank 1: {', '.join(r['ids'])})" in lines[0]
    assert "holds the last finite weights (those after step 1)" in lines[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["train/steps"] == 3 and summary["train/nonfinite_steps"] == 2
    monkeypatch.syspath_prepend(str(tmp_path))  # the checkpoint's config names the plugin (inactive here)
    assert export_main([str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "consolidated")]) == 0
    weights = read_weights(str(tmp_path / "consolidated"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
