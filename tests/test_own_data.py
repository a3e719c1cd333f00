"""The README's "Train on your own videos" steps at tiny size: records -> prepare -> train on the
shards with a held-out split -> evaluate.py; and what a run says when the data does not fit."""

import json
import os
import shutil

import pytest

from conftest import compose, run_cli, tiny_overrides, train_tiny
from panda.training.callbacks import SkippedDataError


@pytest.mark.slow
def test_own_videos_from_records_to_a_scored_held_out_split(synthetic_root, tmp_path):
    records = os.path.join(synthetic_root, "train", "train_json", "synthetic_train.json")
    tokenizer = os.path.join(synthetic_root, "tokenizer")
    shards = tmp_path / "shards" / "mine"
    qa = os.path.join(synthetic_root, "eval", "Synthetic_Zero_Shot_QA")
    run_cli(["-m", "panda.data.prepare", "--records", records, "--video-root", os.path.join(synthetic_root, "train"),
             "--output", str(shards), "--tokenizer", tokenizer, "--frames", "4", "--no-progress"])
    assert (shards / "rejects.jsonl").exists() and json.loads((shards / "stats.json").read_text())
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_root) if not o.startswith(("data.root", "data.synthetic"))]
    proc = run_cli(["train.py", "data=valley", f"data.root={shards}", f"data.eval_qa={qa}", f"llm.tokenizer={tokenizer}",
                    "trainer.max_steps=3", f"hydra.run.dir={run_dir}", *overrides])
    console = proc.stdout + proc.stderr  # quiet: no library tips, no Lightning deprecation, one parameter table
    for noise in ("Tip:", "LeafSpec", "estimate number of stepping batches", "Total estimated model params size"):
        assert noise not in console, noise
    assert "trainable" in console
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train/steps"] == 3 and summary["eval/num_questions"] == 6 and summary["eval/judged"] == 6
    assert len((run_dir / "heldout" / "predictions.jsonl").read_text().splitlines()) == 6
    eval_dir = tmp_path / "eval"
    run_cli(["evaluate.py", f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", "num_workers=0", "max_new_tokens=16",
             "benchmark.synthetic.limit=6", f"hydra.run.dir={eval_dir}"])
    results = json.loads((eval_dir / "results.json").read_text())["benchmarks"]["synthetic"]
    assert results["accuracy"] == summary["eval/accuracy"] and results["judged"] == 6


def test_a_run_without_a_held_out_split_says_so(synthetic_root, tmp_path):
    summary = train_tiny(synthetic_root, tmp_path, "trainer.max_steps=1", "data.eval_qa=null")
    assert "data.eval_qa" in summary["eval/skipped"] and "eval/accuracy" not in summary
    assert "data.eval_qa" in json.loads((tmp_path / "summary.json").read_text())["eval/skipped"]


def test_text_the_tokenizer_cannot_read_is_warned_about_once(synthetic_root, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    path = root / "train" / "train_json" / "synthetic_train.json"
    records = json.loads(path.read_text())
    for record in records:  # answers in a script the synthetic tokenizer never saw
        for turn in record["conversations"]:
            if turn["from"] == "gpt":
                turn["value"] = "東京タワーは赤い"
    path.write_text(json.dumps(records))
    caplog.set_level("WARNING")
    # spans: the samples train, and the unknown-token share is warned about once
    train_tiny(str(root), tmp_path / "run", "trainer.max_steps=3", "evaluate=false", "model.tokenization=spans")
    warnings = [r.getMessage() for r in caplog.records if "unknown token" in r.getMessage()]
    assert len(warnings) == 1 and "llm.pretrained" in warnings[0]
    # release: <unk> is the pad id, so the release's label arithmetic rejects each sample, saying why,
    # and a run that trained on nothing stops instead of saving a checkpoint
    caplog.clear()
    with pytest.raises(SkippedDataError, match=r"(?s)12 of the 12 training samples read in epoch 0 were skipped \(unusable_sample 12\): every sample.*the tokenizer cannot read part"):
        train_tiny(str(root), tmp_path / "run2", "trainer.max_steps=3", "evaluate=false")
    skipped = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert skipped and all("the tokenizer cannot read part of this text" in m for m in skipped)
    assert not (tmp_path / "run2" / "checkpoints" / "last.ckpt").exists()


def _without_videos(synthetic_root, tmp_path, share: float):
    """A copy of the dataset with the first ``share`` of its training videos deleted."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    videos = sorted((root / "train" / "synthetic").iterdir())
    for video in videos[: round(share * len(videos))]:
        video.unlink()
    return root


def test_a_run_whose_videos_are_all_missing_stops_naming_data_video_root(synthetic_root, tmp_path):
    """The own-data command without data.video_root: every video is missing. The run must not exit 0
    with a checkpoint of a model that trained on nothing."""
    with pytest.raises(SkippedDataError) as err:
        train_tiny(synthetic_root, tmp_path / "run", "trainer.max_epochs=1", "data.video_root=elsewhere", "evaluate=false")
    message = str(err.value)
    total = sum(1 for _ in json.load(open(os.path.join(synthetic_root, "train", "train_json", "synthetic_train.json"))))
    assert message.startswith(f"{total} of the {total} training samples read in epoch 0 were skipped (missing {total}): every sample")
    assert "fix: data.video_root" in message and f"it is now {os.path.join(synthetic_root, 'elsewhere')}" in message
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_run_stops_when_more_than_max_skipped_fraction_is_skipped(synthetic_root, tmp_path):
    root = _without_videos(synthetic_root, tmp_path, 0.6)
    with pytest.raises(SkippedDataError, match=r"(?s)\(missing \d+\): more than data\.max_skipped_fraction=0\.5.*\n  missing: e\.g\. .*file not found"):
        train_tiny(str(root), tmp_path / "strict", "trainer.max_epochs=1", "evaluate=false")
    summary = train_tiny(str(root), tmp_path / "lenient", "trainer.max_epochs=1", "evaluate=false",
                         "data.max_skipped_fraction=0.9")  # the researcher accepts the loss: it trains on the rest
    assert 0 < summary["train/skipped_samples"] and summary["train/steps"] >= 1
    assert (tmp_path / "lenient" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_the_all_skipped_run_exits_2_from_the_command_line(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["train.py", *tiny_overrides(synthetic_root), "data.video_root=elsewhere", "trainer.max_epochs=1",
                    "evaluate=false", f"hydra.run.dir={run_dir}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.py: error: " in proc.stderr and "were skipped (missing" in proc.stderr and "fix: data.video_root" in proc.stderr
    assert not (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "summary.json").exists()


def test_real_data_without_a_root_names_the_folder_it_needs():
    from panda.config import to_train_config

    with pytest.raises(ValueError, match=r"data\.root=/path/to/prepared/shards: the --output folder of `python -m panda\.data\.prepare`"):
        to_train_config(compose(["data=valley"]))
    with pytest.raises(ValueError, match=r"data\.root=/path/to/DATA_ROOT: the folder the record files"):
        to_train_config(compose(["data=json"]))


def test_raw_records_given_as_shards_are_recognised(synthetic_root):
    from panda.data.shards import ShardFormatError, ShardSource

    records = os.path.join(synthetic_root, "train", "train_json", "synthetic_train.json")
    for wrong in (records, os.path.join(synthetic_root, "train")):
        with pytest.raises(ShardFormatError, match=r"holds raw data .*synthetic_train\.json.*panda\.data\.prepare.*data=json"):
            ShardSource.open("mine", wrong)
