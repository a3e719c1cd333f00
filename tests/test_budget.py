"""Long videos: ``data.sampling`` fps / budget — the token budget is never exceeded and
is filled to within one chunk, chunks stay whole, frames are deterministic, batches mixing frame
counts give each video exactly what it would get alone, and training and evaluation honour it."""

import itertools
import os

import pytest
import torch

from conftest import compose, make_video_file, tiny_video_lm, train_tiny
from panda.config import to_train_config
from panda.data.budget import SamplingRule

RELEASE_SIZES = dict(chunk_size=4, resolution=448, patch_size=14, ratio=2)


@pytest.mark.parametrize("budget", [1092, 2000, 2464, 4096, 9000])
def test_the_budget_is_never_exceeded_and_filled_to_within_one_chunk(budget):
    rule = SamplingRule("budget", max_frames=64, max_visual_tokens=budget, **RELEASE_SIZES)
    # 16 x 16 + 17 and 9 x 17 + 1 (docs/model-reference.md, "Tokens per frame")
    assert rule.square_tokens() == 273 and rule.tokens_per_frame(720, 1280) == 154
    sizes = [(720, 1280), (480, 640), (1080, 1080), (1280, 720), (240, 1280)]
    lengths = [(2, 30.0), (7, 25.0), (90, 30.0), (1800, 30.0), (18000, 30.0), (400, 8.0)]
    for (h, w), (n, fps) in itertools.product(sizes, lengths):
        idx = rule.pick(n, fps, lambda: (h, w))
        count = rule.padded_count(len(idx))
        per_frame = rule.tokens_per_frame(h, w)
        used = rule.visual_tokens(count, len(idx), h, w)
        assert count % 4 == 0 and count >= 4 and len(idx) <= count  # whole chunks
        assert used <= budget, (h, w, n, budget)  # never exceeded, padding frames (square tokens) included
        assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx) and rule.pick(n, fps, lambda: (h, w)) == idx
        if n >= count + 4 and count + 4 <= 64:  # neither the video nor max_frames stopped it: filled to within a chunk
            assert used + 4 * per_frame > budget, (h, w, n, budget, count)


def test_fps_mode_takes_frames_at_the_rate_capped_and_chunked():
    rule = SamplingRule("fps", sample_fps=1.0, max_frames=16, **RELEASE_SIZES)
    assert len(rule.pick(30 * 10, 30.0, None)) == 8  # 10 s at 1 fps: 10 candidates -> 8 (whole chunks)
    assert rule.pick(30 * 10, 30.0, None) == [0, 30, 60, 90, 150, 180, 210, 270]
    assert len(rule.pick(30 * 600, 30.0, None)) == 16  # 10 minutes: capped at max_frames
    assert rule.padded_count(len(rule.pick(3, 30.0, None))) == 4  # a 3-frame clip: one chunk, padded
    two_fps = SamplingRule("fps", sample_fps=2.0, max_frames=64, **RELEASE_SIZES)
    assert len(two_fps.pick(30 * 10, 30.0, None)) == 20


def test_limits_that_cannot_hold_one_chunk_fail_at_composition():
    base = ["data.root=/x", "data.synthetic=null"]
    with pytest.raises(ValueError, match=r"data.max_visual_tokens=50 does not hold one STAB chunk.*>= 84"):
        to_train_config(compose(base + ["data.sampling=budget", "data.max_visual_tokens=50"]))
    with pytest.raises(ValueError, match="data.max_frames=2 is less than one STAB chunk"):
        to_train_config(compose(base + ["data.sampling=fps", "data.max_frames=2"]))
    with pytest.raises(Exception, match="sampling"):
        to_train_config(compose(base + ["data.sampling=random"]))


def _tiny_pipeline(budget, teacher=None):
    from panda.data.datasets import FramePipeline

    rule = SamplingRule("budget", frames=4, max_frames=16, max_visual_tokens=budget, chunk_size=4, resolution=112)
    return FramePipeline(4, 112, 14, 2, sampling=rule, teacher_resolution=teacher)


def test_a_batch_mixing_frame_counts_gives_each_video_what_it_gets_alone(tmp_path, tokenizer):
    from panda.data.conversation import get_template
    from panda.data.datasets import Collator, ConversationDataset
    from panda.data.records import VideoRecord

    wide = make_video_file(str(tmp_path / "wide.mp4"), 64, 36, 24, fps=8, seed=1)  # 16 tokens per frame
    square = make_video_file(str(tmp_path / "square.mp4"), 48, 48, 24, fps=8, seed=2)  # 21
    pipeline = _tiny_pipeline(128)  # 16:9 -> 8 frames (128 tokens), square -> 4 (84)
    records = [VideoRecord("w", os.path.basename(wide), [("<video>\nWhat colour?", "Red.")]),
               VideoRecord("s", os.path.basename(square), [("<video>\nWhat colour?", "Red.")])]
    ds = ConversationDataset(records, str(tmp_path), tokenizer, get_template("vicuna_v1"), pipeline, 512, 21)
    a, b = ds[0], ds[1]
    assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
    assert a["pixels"].shape[0] == 8 and b["pixels"].shape[0] == 4
    assert int((a["input_ids"] == -200).sum()) == 8 and int((b["input_ids"] == -200).sum()) == 4
    batch = Collator(tokenizer.pad_token_id)([a, b])
    assert batch["pixels"].shape[:2] == (2, 8) and batch["frame_counts"].tolist() == [8, 4]
    assert batch["frame_mask"][1, 4:].sum() == 0

    model = tiny_video_lm(tokenizer)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"])
    mixed = model.prepare_inputs(*args, labels=batch["labels"], frame_counts=batch["frame_counts"])
    for i, sample in enumerate((a, b)):
        alone = Collator(tokenizer.pad_token_id)([sample])
        single = model.prepare_inputs(alone["input_ids"], alone["attention_mask"], alone["pixels"], alone["frame_mask"],
                                      labels=alone["labels"])
        n = single.inputs_embeds.shape[1]
        assert int(mixed.attention_mask[i].sum()) == n  # absent frames got no tokens
        assert torch.allclose(mixed.inputs_embeds[i, :n], single.inputs_embeds[0], atol=1e-6)
        assert torch.equal(mixed.labels[i, :n], single.labels[0])
    out = model(*args, batch["labels"], frame_counts=batch["frame_counts"])
    assert torch.isfinite(out.loss)
    out.loss.backward()  # every trained STAB weight gets its gradient through both counts
    with pytest.raises(ValueError, match="one frame placeholder per frame"):
        model(*args, batch["labels"])  # without the counts the absent frames would need placeholders


def test_training_and_evaluation_honour_the_budget(synthetic_root, tmp_path):
    """The synthetic videos come in four aspect ratios: under a 128-token budget the 16:9 and 4:3
    ones get 8 frames, square and portrait 4, so batches mix counts."""
    summary = train_tiny(synthetic_root, tmp_path / "run", "data.sampling=budget", "data.max_visual_tokens=128",
                         "data.max_frames=16", "trainer.max_steps=4", "data.eval_limit=4")
    assert summary["train/steps"] == 4 and summary["train/skipped_samples"] == 0
    assert summary["eval/judged"] == summary["eval/num_questions"] == 4  # the held-out answers, under the budget too

    from panda.evaluation.run import evaluate

    results = evaluate(compose([f"checkpoint={summary['checkpoint']}", f"run_dir={tmp_path / 'eval'}", "num_workers=0",
                                "benchmark=[synthetic]", "benchmark.synthetic.limit=4", "sampling=budget",
                                "max_visual_tokens=128", "max_frames=16", "max_new_tokens=4"], config_name="evaluate"))
    assert results["benchmarks"]["synthetic"]["judged"] == 4
    with pytest.raises(ValueError, match="max_visual_tokens=50"):
        evaluate(compose([f"checkpoint={summary['checkpoint']}", f"run_dir={tmp_path / 'eval2'}", "benchmark=[synthetic]",
                          "sampling=budget", "max_visual_tokens=50"], config_name="evaluate"))


def test_the_planner_plans_the_most_a_video_can_get():
    from panda.plan import plan, planned_frames

    base = ["data.root=/x", "data.synthetic=null", "stab.width=32"]
    release = to_train_config(compose(base))
    budget = to_train_config(compose(base + ["data.sampling=budget", "data.max_visual_tokens=128", "data.max_frames=16"]))
    fps = to_train_config(compose(base + ["data.sampling=fps", "data.max_frames=12"]))
    assert planned_frames(release) == 4 and planned_frames(fps) == 12
    assert planned_frames(budget) == 16  # the narrowest frame costs 6 tokens: 21 fit, max_frames caps at 16
    p_release, p_budget = plan(release, gpu="cpu", vocab=300), plan(budget, gpu="cpu", vocab=300)
    assert p_budget.visual_tokens == 128 and p_release.visual_tokens == 4 * 21
    assert p_budget.sequence == release.model.max_length - 16 + 128
    assert any("data.sampling=budget" in n for n in p_budget.notes)


def test_one_sampling_dataclass_for_training_evaluate_py_and_lmms_eval():
    """The sampling keys are SamplingConfig's, declared once: data.* of training, evaluate.py's top-level
    keys and lmms-eval's model_args make the same rule."""
    import dataclasses

    pytest.importorskip("lmms_eval")
    from panda.config import DataConfig, EvaluateConfig, to_evaluate_config
    from panda.data.budget import Sampling, SamplingConfig, sampling_rule
    from panda.evaluation import lmms

    names = [f.name for f in dataclasses.fields(SamplingConfig)]
    assert names == ["sampling", "sample_fps", "max_frames", "max_visual_tokens"]
    for schema in (DataConfig, EvaluateConfig):  # inherited, never declared again
        assert issubclass(schema, SamplingConfig)
        assert all(schema.__dataclass_fields__[n] is SamplingConfig.__dataclass_fields__[n] for n in names)
    assert not hasattr(lmms, "_Sampling")
    train = to_train_config(compose(["data.root=/x", "data.synthetic=null", "data.sampling=budget",
                                     "data.max_visual_tokens=128", "data.max_frames=16"]))
    evaluate = to_evaluate_config(compose(["checkpoint=/c", "sampling=budget", "max_visual_tokens=128", "max_frames=16"],
                                          config_name="evaluate"))
    model_args = lmms.sampling_config({"sampling": "budget", "max_visual_tokens": "128", "max_frames": "16", "device": "cpu"})
    assert type(model_args) is SamplingConfig and model_args.sampling is Sampling.budget
    rules = {sampling_rule(s, train.stab, 4) for s in (train.data, evaluate, model_args)}
    assert len(rules) == 1 and next(iter(rules)).max_visual_tokens == 128
    assert lmms.sampling_config({}) == SamplingConfig()  # lmms-eval's defaults are evaluate.py's
    with pytest.raises(ValueError, match=r"^sampling='random': use one of release, fps, budget$"):
        lmms.sampling_config({"sampling": "random"})


def test_the_host_planned_splice_equals_the_device_one_to_the_bit(tmp_path, tokenizer):
    """With the collator's host copies (``batch["host"]``) STAB and the splice read nothing back from
    the device; what they make is what the device-side path makes, for a batch of two aspect ratios
    and two frame counts, for the loss and its gradients too."""
    from panda.data.conversation import get_template
    from panda.data.datasets import Collator, ConversationDataset
    from panda.data.records import VideoRecord

    wide = make_video_file(str(tmp_path / "wide.mp4"), 64, 36, 24, fps=8, seed=1)
    square = make_video_file(str(tmp_path / "square.mp4"), 48, 48, 24, fps=8, seed=2)
    records = [VideoRecord("w", os.path.basename(wide), [("<video>\nWhat colour?", "Red."), ("And the shape?", "A disc.")]),
               VideoRecord("s", os.path.basename(square), [("<video>\nWhat colour?", "Red.")])]
    ds = ConversationDataset(records, str(tmp_path), tokenizer, get_template("vicuna_v1"), _tiny_pipeline(128), 512, 21)
    batch = Collator(tokenizer.pad_token_id, patch_size=14)([ds[0], ds[1]])
    host = batch["host"]
    assert host["frame_counts"] == [8, 4] and host["patch_valid"].shape == (2, 8, 8, 8)
    assert (host["input_ids"] == batch["input_ids"].numpy()).all()

    model = tiny_video_lm(tokenizer)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"])
    planned = model.prepare_inputs(*args, labels=batch["labels"], host=host)
    found = model.prepare_inputs(*args, labels=batch["labels"], frame_counts=batch["frame_counts"])
    for field in ("inputs_embeds", "attention_mask", "labels", "position_ids", "visual_positions"):
        assert torch.equal(getattr(planned, field), getattr(found, field)), field
    keep = found.labels[:, 1:] != -100
    assert torch.equal(planned.supervised_targets, found.labels[:, 1:][keep])
    assert planned.supervised_samples.tolist() == [0] * int(keep[0].sum()) + [1] * int(keep[1].sum())

    losses, grads = [], []
    for kwargs in ({"host": host}, {"frame_counts": batch["frame_counts"]}):
        model.zero_grad()
        out = model(*args, batch["labels"], **kwargs)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert torch.equal(losses[0], losses[1]) and all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_host_copies_survive_a_loader_worker(tmp_path, tokenizer):
    """A worker sends the batch through shared memory (the tensors' storage moves there): the host
    copies must be copies, not views of the memory that move frees."""
    from panda.data.conversation import get_template
    from panda.data.datamodule import make_loader
    from panda.data.datasets import ConversationDataset
    from panda.data.records import VideoRecord

    records = [VideoRecord(f"v{i}", f"v{i}.mp4", [("<video>\nWhat colour?", "Red.")]) for i in range(4)]
    for i in range(4):
        make_video_file(str(tmp_path / f"v{i}.mp4"), 48 + 16 * i, 48, 24, fps=8, seed=i)
    ds = ConversationDataset(records, str(tmp_path), tokenizer, get_template("vicuna_v1"), _tiny_pipeline(128), 512, 21)
    for batch in make_loader(ds, 2, 1, tokenizer.pad_token_id, patch_size=14):
        host = batch["host"]
        assert (host["input_ids"] == batch["input_ids"].numpy()).all() and (host["labels"] == batch["labels"].numpy()).all()
        assert (host["input_ids"] == -200).sum() == batch["frame_mask"].flatten(2).amax(2).sum()  # a placeholder per frame
