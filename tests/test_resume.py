"""Resuming never loses finished work: resume=auto on a copied or finished run, a changed config,
and the metrics log and loss history across a resume."""

import csv
import hashlib
import json
import os
import shutil

import pytest

from conftest import compose, tiny_overrides


def _train(root, run_dir, *extra):
    from panda.training.run import train

    return train(compose(tiny_overrides(root, str(run_dir)) + ["evaluate=false", "logger=csv",
                                                               "trainer.log_every_n_steps=1", *extra]))


def _fingerprint(folder) -> dict:
    """Every file under ``folder`` and the hash of its bytes."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _logged_steps(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]


def test_resume_auto_on_a_copied_finished_run_changes_nothing_anywhere(synthetic_root, tmp_path, capsys):
    original = tmp_path / "runs" / "default" / "first"
    _train(synthetic_root, original, "trainer.max_steps=4", "trainer.max_epochs=3")
    marker = json.loads((original / "checkpoints" / "complete.json").read_text())
    assert marker["file"] == "last.ckpt" and "path" not in marker and marker["finished"]  # relative to its folder
    copy_root = tmp_path / "copy"
    shutil.copytree(tmp_path / "runs", copy_root)
    before = {"original": _fingerprint(original), "copy": _fingerprint(copy_root)}

    summary = _train(synthetic_root, copy_root / "default" / "new", f"runs_root={copy_root}", "resume=auto",
                     "trainer.max_steps=3", "trainer.max_epochs=3")
    out = capsys.readouterr().out
    assert f"the run in {copy_root / 'default' / 'first'} already reached step 4" in out  # the copy, not its source
    assert "nothing was changed" in out and summary["train/steps"] == 4
    assert _fingerprint(original) == before["original"] and _fingerprint(copy_root) == before["copy"]
    assert not (copy_root / "default" / "new").exists()


def test_resume_auto_refuses_a_changed_config_and_names_the_keys(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    _train(synthetic_root, runs / "default" / "first", "trainer.max_steps=2", "trainer.max_epochs=3")
    with pytest.raises(ValueError, match=r"\n  stage\.lr: 0\.001 -> 0\.005\n") as err:
        _train(synthetic_root, runs / "default" / "second", f"runs_root={runs}", "resume=auto", "trainer.max_steps=5",
               "trainer.max_epochs=3", "stage.lr=5e-3")
    assert "trainer.max_steps:" not in str(err.value)  # the step limit may change


def test_a_resumed_run_keeps_its_metrics_log_and_loss_history(synthetic_root, tmp_path):
    common = ["trainer.max_epochs=5", "trainer.checkpoint_every_n_steps=1000", "stage.schedule=constant", "stage.warmup_ratio=0"]
    straight = _train(synthetic_root, tmp_path / "straight", "trainer.max_steps=8", *common)
    _train(synthetic_root, tmp_path / "split", "trainer.max_steps=3", *common)
    resumed = _train(synthetic_root, tmp_path / "split", "trainer.max_steps=8", "resume=last", *common)
    assert resumed["train/loss_by_step"] == straight["train/loss_by_step"]  # the history came back with the checkpoint
    assert resumed["train/loss_first"] == straight["train/loss_first"]
    assert _logged_steps(tmp_path / "split") == _logged_steps(tmp_path / "straight") == list(range(8))  # appended, no gap


def test_resume_auto_continues_a_copied_run_in_the_copy_with_a_raised_step_limit(synthetic_root, tmp_path):
    original = tmp_path / "runs" / "default" / "first"
    _train(synthetic_root, original, "trainer.max_steps=3", "trainer.max_epochs=3")
    copy_root = tmp_path / "copy"
    shutil.copytree(tmp_path / "runs", copy_root)
    before = _fingerprint(original)
    summary = _train(synthetic_root, copy_root / "default" / "new", f"runs_root={copy_root}", "resume=auto",
                     "trainer.max_steps=5", "trainer.max_epochs=3")
    assert summary["run_dir"] == str(copy_root / "default" / "first")
    assert [s for s, _ in summary["train/loss_by_step"]] == [1, 2, 3, 4, 5]
    assert _logged_steps(copy_root / "default" / "first") == list(range(5))
    assert _fingerprint(original) == before


@pytest.mark.slow
def test_ctrl_c_saves_a_complete_checkpoint_and_prints_the_command_that_resumes(synthetic_root, tmp_path):
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, run_cli

    from panda.training.callbacks import read_marker

    run_dir = tmp_path / "run"
    args = ["train.py", *tiny_overrides(synthetic_root), "evaluate=false", "trainer.max_steps=2000", "trainer.max_epochs=100",
            "trainer.checkpoint_every_n_steps=3", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and read_marker(str(run_dir / "checkpoints")) is None:
        time.sleep(0.2)
    assert read_marker(str(run_dir / "checkpoints")) is not None, "no checkpoint was written"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    marker = read_marker(str(run_dir / "checkpoints"))
    assert marker["file"] == "last.ckpt" and not marker["finished"] and marker["step"] >= 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["train/steps"] == marker["step"]
    command = shlex.split(out.split("Resume with:\n", 1)[1].splitlines()[0])
    assert command[:2] == ["python", "train.py"] and "resume=last" in command and f"hydra.run.dir={run_dir}" in command
    # the printed command, with a step limit a few steps on, continues the same run
    limit = marker["step"] + 3
    run_cli(["train.py", *(f"trainer.max_steps={limit}" if a == "trainer.max_steps=2000" else a for a in command[2:])])
    final = json.loads((run_dir / "summary.json").read_text())
    assert [s for s, _ in final["train/loss_by_step"]] == list(range(1, limit + 1)) and "status" not in final


def test_resume_takes_last_a_path_or_auto_and_names_the_old_key(synthetic_root, tmp_path):
    """One key resumes: resume=last (this run dir), resume=PATH (a checkpoint), resume=auto; the old
    ckpt_path names its replacement."""
    from panda.config import TrainConfig
    from panda.errors import ConfigError
    from panda.overrides import check_overrides

    common = ["trainer.max_epochs=5", "stage.schedule=constant", "stage.warmup_ratio=0"]
    straight = _train(synthetic_root, tmp_path / "straight", "trainer.max_steps=6", *common)
    _train(synthetic_root, tmp_path / "first", "trainer.max_steps=4", *common)
    from_path = _train(synthetic_root, tmp_path / "second", "trainer.max_steps=6", *common,
                       f"resume={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert from_path["train/loss_by_step"] == straight["train/loss_by_step"]
    with pytest.raises(ConfigError, match=r"resume=last: .*last\.ckpt does not exist"):
        _train(synthetic_root, tmp_path / "never_ran", "trainer.max_steps=6", "resume=last")
    with pytest.raises(ValueError, match=r"ckpt_path is now resume \(resume=last continues this run dir"):
        check_overrides(["ckpt_path=last"], TrainConfig)
