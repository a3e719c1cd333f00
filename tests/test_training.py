import json
import os
import shutil

import pytest
import torch

from conftest import compose, tiny_overrides
from conftest import train_tiny as run


def test_tiny_run_learns_and_writes_summary(synthetic_root, tmp_path):
    summary = run(synthetic_root, tmp_path, "trainer.max_epochs=12", "stage.lr=3e-3")
    assert summary["train/loss_final"] < 0.5 * summary["train/loss_first"]
    written = json.loads((tmp_path / "summary.json").read_text())
    for key in ("eval/accuracy", "eval/accuracy_appearance", "eval/accuracy_motion", "train/loss_final", "checkpoint",
                "time/wall_s", "params/stab", "params/projector", "params/llm", "params/trainable"):
        assert key in written, key
    assert os.path.exists(written["checkpoint"])
    assert written["params/trainable"] == written["params/stab"] + written["params/projector"] + written["params/llm"]
    predictions = (tmp_path / "heldout" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == written["eval/num_questions"] == written["eval/judged"] == 6


def test_resume_restores_step_optimizer_and_schedule(synthetic_root, tmp_path):
    run(synthetic_root, tmp_path, "trainer.max_steps=4", "trainer.max_epochs=5", "evaluate=false")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, weights_only=False)
    assert first["global_step"] == 4
    # resume=last: the newest checkpoint of this run directory
    run(synthetic_root, tmp_path, "trainer.max_steps=7", "trainer.max_epochs=5", "evaluate=false", "resume=last")
    second = torch.load(ckpt, weights_only=False)
    assert second["global_step"] == 7
    assert second["lr_schedulers"][0]["last_epoch"] == 7
    adam_steps = {float(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert adam_steps == {7.0}  # the optimiser kept counting from 4, it did not start again
    assert not all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])


def test_bad_videos_are_skipped_counted_and_named(synthetic_root, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    records_path = root / "train" / "train_json" / "synthetic_train.json"
    records = json.loads(records_path.read_text())[:6]
    (root / "train" / "synthetic" / "00000.mp4").write_bytes(b"\x00" * 1000)  # corrupt
    records[1]["video"] = "synthetic/missing.mp4"  # missing
    records.append({"id": "broken"})  # malformed record
    records_path.write_text(json.dumps(records))
    summary = run(str(root), tmp_path / "run", "trainer.max_epochs=1", "evaluate=false")
    assert summary["train/skipped_samples"] == 2
    assert summary["data/rejected_records"] == 1
    assert "missing.mp4" in caplog.text and "00000.mp4" in caplog.text
    rejects = (tmp_path / "run" / "rejects.jsonl").read_text()
    assert '"index": 6' in rejects


def test_stage_prealign_freezes_the_llm(synthetic_root, tmp_path):
    import lightning as L

    from panda.build import build_model, build_tokenizer
    from panda.config import to_train_config
    from panda.training.run import train

    cfg = to_train_config(compose(tiny_overrides(synthetic_root, str(tmp_path)) + ["stage=prealign", "trainer.max_steps=3",
                                                                                  "evaluate=false"]))
    summary = train(cfg)
    assert summary["trainable/llm"] == 0 and summary["trainable/stab"] == summary["params/stab"]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # train() seeds, then builds the model: the same seed rebuilds the weights it started from
    L.seed_everything(cfg.seed)
    start = {"model." + k: v for k, v in build_model(cfg, build_tokenizer(cfg)).state_dict().items()}
    llm_keys = [k for k in saved if k.startswith("model.llm.")]
    stab_keys = [k for k in saved if k.startswith("model.stab.") and saved[k].is_floating_point()]
    assert llm_keys and all(torch.equal(saved[k], start[k]) for k in llm_keys)
    assert not all(torch.equal(saved[k], start[k]) for k in stab_keys)


def test_evaluate_py_reproduces_the_training_run_evaluation(synthetic_root, tmp_path):
    from panda.evaluation.run import evaluate

    summary = run(synthetic_root, tmp_path / "train", "trainer.max_steps=6", "trainer.max_epochs=3")
    cfg = compose([f"checkpoint={summary['checkpoint']}", f"run_dir={tmp_path / 'eval'}", "num_workers=0",
                   "max_new_tokens=16", "benchmark.synthetic.limit=6"], config_name="evaluate")
    results = evaluate(cfg)["benchmarks"]["synthetic"]
    assert results["num_questions"] == summary["eval/num_questions"] == results["judged"]
    assert results["accuracy"] == summary["eval/accuracy"]
    train_preds = (tmp_path / "train" / "heldout" / "predictions.jsonl").read_text()
    assert train_preds == (tmp_path / "eval" / "synthetic" / "predictions.jsonl").read_text()
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["checkpoint"] == summary["checkpoint"]


def test_evaluate_names_a_missing_checkpoint(tmp_path):
    from panda.evaluation.run import evaluate

    cfg = compose([f"checkpoint={tmp_path}/nope.ckpt", f"run_dir={tmp_path}"], config_name="evaluate")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        evaluate(cfg)


def test_mid_epoch_resume_continues_with_exactly_the_batches_of_an_uninterrupted_run(synthetic_root, tmp_path):
    # a constant learning rate, so a run stopped at step 5 follows the same schedule as one run to 16
    common = ["trainer.max_epochs=5", "evaluate=false", "trainer.checkpoint_every_n_steps=1000",
              "stage.schedule=constant", "stage.warmup_ratio=0"]
    straight = run(synthetic_root, tmp_path / "straight", "trainer.max_steps=16", *common)
    run(synthetic_root, tmp_path / "split", "trainer.max_steps=5", *common)
    resumed = run(synthetic_root, tmp_path / "split", "trainer.max_steps=16", *common, "resume=last")
    assert [s for s, _ in resumed["train/loss_by_step"]] == list(range(1, 17))  # the history before the resume came back
    assert resumed["train/loss_by_step"] == straight["train/loss_by_step"]  # same batches, same losses
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["epoch"] >= 1  # the comparison crossed an epoch boundary after the resume
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_batch_sampler_splits_ranks_and_skips_exactly():
    from panda.data.sampling import EpochBatchSampler, SourceSpec

    def indices(sampler):
        return [[i for i, _, _ in batch] for batch in sampler]

    src = [SourceSpec("records", 10, list(range(10)), lengths=list(range(10)))]
    ranks = [EpochBatchSampler(src, 2, seed=3, rank=r, world=2) for r in range(2)]
    a, b = (indices(s) for s in ranks)
    assert len(a) == len(b) == 3  # 5 batches, padded to 6 by repeating the first
    flat = sorted(i for batch in a + b for i in batch)
    assert set(flat) == set(range(10)) and len(flat) == 12  # every sample, 2 of them twice (the pad batch)
    a1 = indices(ranks[0])  # the next iteration draws the next epoch
    assert a1 != a
    assert [pos for *_, pos in (batch[0] for batch in ranks[0])] == [0, 1, 2]  # batches carry their position

    again = EpochBatchSampler(src, 2, seed=3, rank=0, world=2)
    iter(again)  # a multi-worker DataLoader starts by iterating twice; only yielding iterations count
    again.set_epoch(7)  # Lightning's counter may differ after a max_steps stop; it does not steer the order
    again.resume(0, 2)
    first = list(again)
    assert [[i for i, _, _ in batch] for batch in first] == a[2:] and first[0][0][1:] == (0, 2)
    assert indices(again) == a1  # and the epoch after continues the same sequence of orders
