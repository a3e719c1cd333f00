"""Sequence packing (data.packing): the same loss and gradients as padded batches, no attention
between packed samples, rows never wider than asked, and exact mid-run resume."""

import pytest
import torch
from conftest import train_tiny

from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from panda.models.packing import padded_share, plan_rows


def test_rows_hold_every_sample_once_within_capacity_deterministically():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 100, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for capacity in (None, 150, 400):  # the default (None) never pads more than unpacked
            rows = plan_rows(lengths, capacity)
            assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
            assert all(sum(lengths[i] for i in row) <= max(max(lengths), capacity or 0) for row in rows)
            assert rows == plan_rows(lengths, capacity)
            assert capacity is not None or padded_share(lengths, rows) <= padded_share(lengths) + 1e-12
    assert plan_rows([30, 10, 20, 5], None) == [[0], [2, 1], [3]]  # best fit: 10 joins 20 (fills it), 5 opens a row


def _batch(make_video, tokenizer, family):
    """Three videos of different aspect ratios (so different visual token counts) and text lengths."""
    from panda.data.datasets import FramePipeline

    pipeline = FramePipeline(2, 56, 7)
    frames = [pipeline(make_video(f"v{k}.mp4", width=w, height=h, frames=4, seed=k))
              for k, (w, h) in enumerate([(64, 64), (96, 54), (40, 72)])]
    g = torch.Generator().manual_seed(3)
    texts = [3, 90, 4]  # one long sample: the two short ones share a row at the default width
    width = 1 + 2 + max(texts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), IGNORE_INDEX)
    for b, n in enumerate(texts):
        row = torch.cat([torch.tensor([1, IMAGE_PLACEHOLDER_ID, IMAGE_PLACEHOLDER_ID]), torch.randint(3, 60, (n,), generator=g)])
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
        labels[b, len(row) - n // 2:len(row)] = row[len(row) - n // 2:]
    pixels = torch.stack([f["pixels"] for f in frames])
    frame_mask = torch.stack([f["frame_mask"] for f in frames])
    return ids, mask, labels, pixels, frame_mask


def _model(family):
    from transformers import GPT2Config, GPT2LMHeadModel

    from panda.models.distill import DistillConfig
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.manual_seed(0)
    if family == "gpt2":
        llm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0))  # dropout masks differ with the layout
    else:
        llm = build_llm(64, hidden_size=32, layers=2, heads=4, intermediate_size=64)
    stab = STABConfig(width=32, patch_size=7, heads=4, chunk_size=2, resolution=56, dropout=0.0)
    return VideoLanguageModel(stab, llm, distill=DistillConfig(layer_stride=1, heads=2), teacher_width=16).train()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_and_padded_batches_give_the_same_losses_and_gradients(make_video, tokenizer, family):
    from panda.models.distill import TeacherFeatures

    model = _model(family)
    ids, mask, labels, pixels, frame_mask = _batch(make_video, tokenizer, family)
    teacher = TeacherFeatures(torch.randn(6, 4, 4, 16), torch.ones(6, 4, 4, dtype=torch.bool))
    params = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for pack in (False, True):
        torch.manual_seed(1)
        out = model(ids, mask, pixels, frame_mask, labels, teacher=teacher, pack=pack)
        runs[pack] = (out, torch.autograd.grad(out.loss, params, allow_unused=True))
    (plain, g_plain), (packed, g_packed) = runs[False], runs[True]
    assert packed.padded_positions < plain.padded_positions  # fewer computed positions
    assert packed.padded_fraction_all < plain.padded_fraction_all
    assert torch.equal(packed.positions, plain.positions)
    assert abs(packed.lm_loss.item() - plain.lm_loss.item()) < 1e-5
    assert abs(packed.distill_loss.item() - plain.distill_loss.item()) < 1e-5
    for a, b in zip(g_plain, g_packed):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # the same targets, sample by sample
    for s in range(3):
        want = plain.logits[plain.target_samples == s]
        got = packed.logits[packed.target_samples == s]
        assert want.shape == got.shape and torch.allclose(want, got, atol=1e-5)


def test_a_packed_sample_never_sees_another(make_video, tokenizer):
    model = _model("llama").eval()
    ids, mask, labels, pixels, frame_mask = _batch(make_video, tokenizer, "llama")
    with torch.no_grad():
        before = model(ids, mask, pixels, frame_mask, labels, pack=True, pack_length=10_000)
        ids2, pixels2 = ids.clone(), pixels.clone()
        ids2[0, 4] = (ids2[0, 4] + 7) % 60 + 3  # sample 0: a prompt token and its frames change
        pixels2[0] = torch.randn_like(pixels2[0])
        after = model(ids2, mask, pixels2, frame_mask, labels, pack=True, pack_length=10_000)
    assert before.padded_positions == int(before.positions.sum())  # one row: all three samples side by side
    others = before.target_samples != 0
    assert torch.equal(before.target_samples, after.target_samples)
    assert torch.allclose(before.logits[others], after.logits[others], atol=1e-6)
    assert not torch.allclose(before.logits[~others], after.logits[~others], atol=1e-3)


def test_packing_resumes_exactly_and_cuts_the_padding_of_a_run(synthetic_root, tmp_path):
    common = ["trainer.log_every_n_steps=1", "stage.schedule=constant", "stage.warmup_ratio=0", "evaluate=false",
              "logger.val_every_n_steps=0", "data.batch_size=6"]
    packing = ["data.packing=true", "data.pack_length=400"]  # the synthetic samples are alike: wider rows to share
    plain = train_tiny(synthetic_root, tmp_path / "plain", "trainer.max_steps=4", *common)
    straight = train_tiny(synthetic_root, tmp_path / "straight", "trainer.max_steps=4", *packing, *common)
    train_tiny(synthetic_root, tmp_path / "split", "trainer.max_steps=2", *packing, *common)
    resumed = train_tiny(synthetic_root, tmp_path / "split", "trainer.max_steps=4", *packing, "resume=last",
                         *common)
    a = torch.load(straight["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for (step, x), (_, y) in zip(straight["train/loss_by_step"], plain["train/loss_by_step"]):
        assert abs(x - y) < 1e-3 * max(1.0, abs(y)), step  # the same training, up to float order
    assert straight["train/padded_fraction_all_mean"] < plain["train/padded_fraction_all_mean"]


def test_prepared_shards_group_batches_by_text_plus_visual_tokens(tmp_path, make_video, synthetic_root):
    """Wide videos give fewer visual tokens than square ones: the sampler sorts by both, from the
    video sizes ``prepare`` stores, so a micro-batch holds videos of one shape."""
    import json as _json

    from panda.data.budget import SamplingConfig, sampling_rule
    from panda.data.prepare import PrepareOptions, prepare
    from panda.data.sampling import EpochBatchSampler, SourceSpec
    from panda.data.shards import ShardSource
    from panda.models.stab import STABConfig

    videos = tmp_path / "videos"
    videos.mkdir()
    records = []
    for k in range(8):
        square = k % 2 == 0
        name = f"v{k}.mp4"
        make_video(f"videos/{name}", width=64 if square else 112, height=64 if square else 40, frames=4, seed=k)
        answer = "red " * (12 if k % 4 in (1, 2) else 3)  # text length independent of the shape
        records.append({"id": f"r{k}", "video": name, "conversations": [
            {"from": "human", "value": "<video>\nWhat colour?"}, {"from": "gpt", "value": answer.strip()}]})
    (tmp_path / "records.json").write_text(_json.dumps(records))
    out = str(tmp_path / "shards")
    prepare(PrepareOptions(records=[str(tmp_path / "records.json")], video_root=str(videos), output=out, frames=4,
                           progress=False, tokenizer=f"{synthetic_root}/tokenizer"))
    source = ShardSource.open("s", out)
    assert source.videos is not None and len(source.videos) == 8
    stab = STABConfig(width=32, heads=4, resolution=112, dropout=0.0)

    rule = sampling_rule(SamplingConfig(), stab, 4)
    full = source.llm_lengths(rule, 4)
    for i, (height, width, *_rest) in enumerate(source.videos):
        assert full[i] == source.lengths[i] + 4 * rule.tokens_per_frame(height, width)
    square = {i for i, (h, w, *_r) in enumerate(source.videos) if h == w}
    assert len(square) == 4 and min(full[i] for i in square) > max(full[i] for i in range(8) if i not in square)

    def batches(lengths):
        sampler = EpochBatchSampler([SourceSpec("s", 8, source.record_chunks(), lengths)], 4, seed=0,
                                    group_by_length=True, group_batches=2)
        return sampler.epoch_batches(0)

    by_text, by_all = batches(source.lengths), batches(full)
    assert any(0 < len(square & set(b)) < len(b) for b in by_text)  # text alone mixes the shapes
    assert all(len(square & set(b)) in (0, len(b)) for b in by_all)  # text + visual tokens: one shape per batch
    assert sum(padded_share([full[i] for i in b]) for b in by_all) < sum(padded_share([full[i] for i in b]) for b in by_text)
