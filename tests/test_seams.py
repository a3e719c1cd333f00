"""The seams between training and evaluation (issue: one-way layers): the loss history under
gradient accumulation, one held-out scorer, a batch with no usable sample on one of two ranks,
a readable run summary, and timeouts that report instead of kill."""

import json
import os
import re
import shutil
import tomllib

import pytest

from conftest import REPO, SUBPROCESS_TIMEOUT, compose, run_cli, tiny_overrides, train_tiny


def test_loss_history_holds_the_real_loss_once_per_optimiser_step(synthetic_root, tmp_path):
    # lr 0: the model never changes, so both runs see the same function of the same samples
    common = ["trainer.max_steps=3", "evaluate=false", "stage.lr=0", "stage.warmup_ratio=0", "stage.schedule=constant"]
    plain = train_tiny(synthetic_root, tmp_path / "plain", "data.batch_size=8", *common)
    accumulated = train_tiny(synthetic_root, tmp_path / "acc", "data.batch_size=4", "trainer.global_batch_size=8", *common)
    assert [s for s, _ in accumulated["train/loss_by_step"]] == [1, 2, 3]  # one entry per optimiser step
    for (_, a), (_, b) in zip(accumulated["train/loss_by_step"], plain["train/loss_by_step"]):
        # the same 8 samples per step: the mean of two micro-batch means is close to the 8-sample mean
        # (token counts differ a little); Lightning's copy of the loss would be half of it
        assert a == pytest.approx(b, rel=0.05)
    assert accumulated["train/loss_first"] == pytest.approx(accumulated["train/loss_by_step"][0][1], abs=1e-6)


def test_the_training_run_and_evaluate_py_score_the_held_out_split_the_same_way(synthetic_root, tmp_path):
    from panda.evaluation.run import evaluate

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    qa = root / "eval" / "Synthetic_Zero_Shot_QA"
    questions = json.loads((qa / "test_q.json").read_text())[:6]
    gone = questions[0]["video_name"]
    for path in (qa / "videos").glob(gone + ".*"):
        path.unlink()
    lost = sum(q["video_name"] == gone for q in questions)
    summary = train_tiny(str(root), tmp_path / "train", "trainer.max_steps=4")
    assert summary["eval/num_questions"] == 6 and summary["eval/missing_videos"] == lost
    assert summary["eval/judged"] == 6 - lost  # a missing video is counted apart, never as a wrong answer
    cfg = compose([f"checkpoint={summary['checkpoint']}", f"run_dir={tmp_path / 'eval'}", "num_workers=0",
                   "max_new_tokens=16", "benchmark.synthetic.limit=6"], config_name="evaluate")
    results = evaluate(cfg)["benchmarks"]["synthetic"]
    for key in ("accuracy", "score", "judged", "num_questions", "accuracy_appearance", "accuracy_motion"):
        assert summary[f"eval/{key}"] == results[key], key
    assert results["missing_videos"]["count"] == summary["eval/missing_videos"]


def _break_first_batch(synthetic_root, tmp_path, tokenizer, world: int):
    """A copy of the dataset whose records in rank 0's first batch (of ``world`` ranks) all point at
    missing videos; returns (data root, overrides, the broken record indices)."""
    from panda.build import build_datamodule
    from panda.config import to_train_config

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    overrides = [o for o in tiny_overrides(str(root)) if not o.startswith("data.batch_size")] + ["data.batch_size=2"]
    datamodule = build_datamodule(to_train_config(compose(overrides)), tokenizer)
    datamodule.setup("fit")
    firsts = [{i for i, *_ in next(iter(datamodule.batch_sampler(rank=r, world=world)))} for r in range(world)]
    broken = firsts[0]
    assert all(not broken & other for other in firsts[1:])  # the other ranks' first batches are fine
    records_path = root / "train" / "train_json" / "synthetic_train.json"
    records = json.loads(records_path.read_text())
    for i in broken:
        records[i]["video"] = f"synthetic/missing_{i}.mp4"
    records_path.write_text(json.dumps(records))
    return root, overrides, broken


def test_a_batch_with_no_usable_sample_trains_nothing_and_is_counted(synthetic_root, tmp_path, tokenizer):
    _, overrides, broken = _break_first_batch(synthetic_root, tmp_path, tokenizer, world=1)
    from panda.training.run import train

    summary = train(compose(overrides + [f"run_dir={tmp_path / 'run'}", "trainer.max_steps=3", "evaluate=false"]))
    assert summary["train/steps"] == 3 and summary["train/skipped_samples"] == len(broken)
    assert [s for s, _ in summary["train/loss_by_step"]] == [2, 3]  # step 1 had nothing to learn from: no loss entry


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_rank_whose_batch_has_no_usable_sample_does_not_hang_the_others(synthetic_root, tmp_path, tokenizer, strategy):
    _, overrides, broken = _break_first_batch(synthetic_root, tmp_path, tokenizer, world=2)
    run_dir = tmp_path / "run"
    extra = ["trainer.fsdp.param_dtype=null"] if strategy == "fsdp" else []
    run_cli(["train.py", f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3",
             "evaluate=false", f"hydra.run.dir={run_dir}", *overrides, *extra], timeout=300)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train/steps"] == 3
    assert summary["train/skipped_samples"] == len(broken)  # rank 0 counted (and logged) its lost batch
    assert [s for s, _ in summary["train/loss_by_step"]] == [2, 3]  # step 1 trained nothing on rank 0: no loss entry


def test_the_terminal_summary_is_readable_and_the_json_keeps_everything(synthetic_root, tmp_path, capsys):
    summary = train_tiny(synthetic_root, tmp_path, "trainer.max_steps=5", "evaluate=false")
    out = capsys.readouterr().out
    assert "== panda run summary ==" in out
    line = next(x for x in out.splitlines() if "train/loss_by_step" in x)
    assert line.split()[-2:] == ["[5", "entries]"] and "[[" not in out
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["train/loss_by_step"] == summary["train/loss_by_step"] and len(written["train/loss_by_step"]) == 5


def test_subprocess_timeouts_stay_below_the_per_test_timeout():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        per_test = tomllib.load(f)["tool"]["pytest"]["ini_options"]["timeout"]
    assert SUBPROCESS_TIMEOUT < per_test
    for name in os.listdir(os.path.join(REPO, "tests")):
        if name.endswith(".py"):
            text = open(os.path.join(REPO, "tests", name)).read()
            for value in re.findall(r"timeout=(\d+)", text):
                assert int(value) < per_test, f"tests/{name}: timeout={value} >= pytest's {per_test} s"
