"""Scale-out on CPU: FSDP2 and DDP over 2 gloo processes, exact resume, SIGKILL + resume=auto,
sharded checkpoints consolidated offline, the SLURM launcher config, and the --multirun guard."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, compose, run_cli, tiny_overrides

from panda.models.checkpoints import read_weights

pytestmark = pytest.mark.slow  # every test here starts processes


def _overrides(root):
    return [o for o in tiny_overrides(root) if not o.startswith("logger=")]


def _train(args):
    return run_cli(["train.py", *args])


TWO_CPU = ["trainer.accelerator=cpu", "trainer.devices=2", "logger=none", "evaluate=false"]


def test_fsdp_shards_half_per_rank_keeps_units_pure_and_stage1_leaves_the_llm_untouched(synthetic_root, tmp_path):
    """... and, distilling, neither rank reads anything back from the device in a micro-batch that does
    not log (the sync audit, tests/test_syncs.py)."""
    run_dir = tmp_path / "fsdp"
    _train(["trainer=fsdp", *TWO_CPU, "trainer.max_steps=3", "stage=prealign", "teacher=tiny_languagebind",
            "distill.layer_stride=1", "distill.heads=4", "export_final=true", "trainer.audit_syncs=true",
            "trainer.log_every_n_steps=3", f"hydra.run.dir={run_dir}", *_overrides(synthetic_root)])
    from test_syncs import check_audit

    for name in ("syncs.json", "syncs_rank1.json"):
        check_audit(json.loads((run_dir / name).read_text()), 3)
    reports = [json.loads((run_dir / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]
    total = reports[0]["global_numel"]
    assert sum(r["local_numel"] for r in reports) == total
    for r in reports:
        assert 0.45 < r["local_numel"] / total < 0.55  # each rank holds about half
        assert r["units_mixing_frozen_and_trainable"] == []
        assert r["frozen_with_grad"] == 0 and r["frozen_in_optimizer"] == 0
        before, after = r["digests_before"], r["digests_after"]
        assert after["llm"] == before["llm"]  # stage 1: the LLM is frozen
        assert after["stab"] != before["stab"] and after["distill_head"] != before["distill_head"]
    assert reports[0]["digests_after"] == reports[1]["digests_after"]  # ranks agree on the full weights
    # the sharded checkpoint is a folder; consolidated offline it equals the export gathered at the end
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").exists()
    from panda.export import main as export_main

    assert export_main([str(ckpt), "--out", str(tmp_path / "consolidated")]) == 0
    a, b = read_weights(str(tmp_path / "consolidated")), read_weights(str(run_dir / "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# DDP's resume in a new process group: tests/test_data_scale.py (from an end-of-epoch checkpoint on shards)
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_resume_in_a_new_process_group_continues_the_loss_trajectory(synthetic_root, tmp_path, strategy):
    common = [f"trainer={strategy}", *TWO_CPU, "trainer.max_epochs=5", "trainer.checkpoint_every_n_steps=1000",
              "stage.schedule=constant", "stage.warmup_ratio=0", "trainer.deterministic=true", *_overrides(synthetic_root)]
    if strategy == "fsdp":
        common.append("trainer.fsdp.param_dtype=null")  # fp32 compute: bit-exact comparisons
        # loader workers prefetch as soon as FSDP's strategy starts the iterator, before it restores
        # the checkpoint: the position must already be known then (VideoDataModule.preload_position)
        common.append("data.num_workers=2")
    _train([*common, "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'straight'}"])
    _train([*common, "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'split'}"])
    _train([*common, "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'split'}", "resume=last"])
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())["train/loss_by_step"]
    resumed = json.loads((tmp_path / "split" / "summary.json").read_text())["train/loss_by_step"]
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]  # steps 1-3 from the checkpoint, 4-6 trained after the resume
    assert resumed == straight


def _marker(run_dirs):
    from panda.training.callbacks import read_marker

    for d in run_dirs:
        marker = read_marker(os.path.join(d, "checkpoints"))
        if marker is not None:
            return marker
    return None


def test_sigkill_mid_run_then_resume_auto_continues_from_the_last_complete_checkpoint(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    args = [f"runs_root={runs}", "name=preempted", "trainer.max_steps=40", "trainer.max_epochs=20",
            "trainer.checkpoint_every_n_steps=4", "logger=none", "evaluate=false", "resume=auto", *_overrides(synthetic_root)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    marker = None
    while time.time() < deadline:
        dirs = [str(p) for p in (runs / "preempted").glob("*")] if (runs / "preempted").exists() else []
        marker = _marker(dirs)
        if marker and marker["step"] >= 8:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean shutdown, like a preempted node
    proc.wait()
    assert marker and marker["step"] >= 8, "the first run never wrote a checkpoint"
    first_dir = os.path.dirname(os.path.dirname(marker["path"]))
    marker = _marker([first_dir])  # the newest complete one at the time of the kill
    # a half-written, newer checkpoint left by the kill must never be picked
    (runs / "preempted" / os.path.basename(first_dir) / "checkpoints" / "step999999.ckpt").write_bytes(b"PK\x03\x04 truncated")
    time.sleep(1.1)  # the second run gets its own timestamped run dir
    proc = _train(args)  # the same command again: no paths given
    summary = json.loads((runs / "preempted" / os.path.basename(first_dir) / "summary.json").read_text())
    assert summary["run_dir"] == first_dir and summary["train/steps"] == 40
    # the history up to the checkpoint came back with it; the steps after it were trained once more
    assert [s for s, _ in summary["train/loss_by_step"]] == list(range(1, 41))
    assert f"continuing {first_dir}" in proc.stdout + proc.stderr


def test_multirun_never_starts_ddp_inside_the_sweep(synthetic_root, tmp_path):
    proc = run_cli(["train.py", "--multirun", "trainer=ddp", *TWO_CPU, "seed=1,2", f"hydra.sweep.dir={tmp_path}",
                    *_overrides(synthetic_root)], check=False)
    assert proc.returncode != 0
    assert "hydra/launcher=slurm" in proc.stderr + proc.stdout
    assert not list(tmp_path.glob("*/checkpoints"))  # nothing trained


def test_slurm_launcher_places_one_job_per_point_with_the_trainer_geometry():
    proc = run_cli(["train.py", "hydra/launcher=slurm", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2",
                    "--cfg", "all", "--resolve"])
    import yaml

    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["max_num_timeout"] > 0  # requeued on preemption / timeout


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    from panda.config import to_train_config
    from panda.training.trainer import build_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = to_train_config(compose(["logger=wandb", "logger.project=p", "logger.offline=true", "name=n"]))
    first = build_logger(cfg, str(tmp_path), {})
    again = build_logger(cfg, str(tmp_path), {})  # the same run dir, as resume=auto picks it
    assert first._id == again._id and (tmp_path / "wandb_run_id").read_text() == first._id
    assert first._wandb_init["resume"] == "allow"
