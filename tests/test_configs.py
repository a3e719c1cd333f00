import glob
import json
import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF, REPO, compose, tiny_overrides
from panda.config import validate
from panda.training.run import train

EXPERIMENTS = sorted(os.path.relpath(p, os.path.join(CONF, "experiment"))[:-5]
                     for p in glob.glob(os.path.join(CONF, "experiment", "**", "*.yaml"), recursive=True))


def test_the_default_composes_to_the_tiny_synthetic_run():
    cfg = compose()
    validate(cfg)
    assert cfg.data.name == "synthetic" and cfg.stage.name == "scratch" and cfg.frames == 4
    assert cfg.stab.width == 64 and cfg.llm.pretrained is None


def test_release_stab_and_paper_stages_compose():
    cfg = compose(["stab=release", "stage=prealign", "frames=8"])
    validate(cfg)
    assert (cfg.stab.width, cfg.stab.resolution, cfg.stab.chunk_size) == (1024, 448, 4)
    assert not cfg.stage.train_llm and cfg.stage.vision_lr == 4e-4 and cfg.stage.lr == 4e-5


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_trains_one_step(experiment, synthetic_root, tmp_path):
    cfg = compose(tiny_overrides(synthetic_root, str(tmp_path)) + [f"experiment={experiment}", "debug=fast_dev_run"])
    validate(cfg)
    summary = train(cfg)
    assert summary["train/steps"] == 1 and summary["eval/num_questions"] == 6  # data.eval_limit
    assert summary["name"] == cfg.name != "default"


@pytest.mark.parametrize("override, message", [
    ("stab.widht=32", "widht"),
    ("stab.width=wide", "width"),
    ("trainer.max_steps=1.5", "max_steps"),
])
def test_invalid_overrides_fail_naming_the_key(override, message):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        compose([override])
    assert message in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override, message", [
    ("frames=6", "stab.chunk_size"),
    ("stab.lsd=maxpool", "stab.lsd"),
    ("logger.kind=tensorboard", "logger.kind"),
])
def test_semantic_errors_name_the_key_and_fix(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose([override]))


def test_multirun_sweeps_ablations_and_frames_from_the_cli(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(synthetic_root, "unused") if not o.startswith("+run_dir")]
    cmd = [sys.executable, "train.py", "--multirun", "experiment=ablation/no_fsra,ablation/no_gstra", "frames=4,8",
           "debug=fast_dev_run", f"hydra.sweep.dir={sweep}", *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(open(p).read()) for p in sorted(glob.glob(str(sweep / "*" / "summary.json")))]
    assert sorted((s["name"], s["frames"]) for s in summaries) == [
        ("ablation_no_fsra", 4), ("ablation_no_fsra", 8), ("ablation_no_gstra", 4), ("ablation_no_gstra", 8)]


def test_wandb_logger_runs_offline_with_config_and_parameter_counts(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(tiny_overrides(synthetic_root, str(tmp_path)) + ["logger=wandb", "logger.kind=wandb", "trainer.max_steps=3", "trainer.log_every_n_steps=1"])
    summary = train(cfg)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    # an offline run keeps config and history in its .wandb record file (what `wandb sync` uploads)
    (record,) = glob.glob(os.path.join(runs[0], "*.wandb"))
    data = open(record, "rb").read()
    for needle in (b"params/stab", str(summary["params/stab"]).encode(), b"train/loss", b"eval/accuracy", b"use_fsra"):
        assert needle in data, needle


def test_ddp_trains_with_two_cpu_processes(synthetic_root, tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = [o for o in tiny_overrides(synthetic_root, "unused") if not o.startswith("+run_dir")]
    cmd = [sys.executable, "train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3",
           "logger=csv", "logger.kind=csv", f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train/steps"] == 3 and summary["eval/num_questions"] == 6
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
