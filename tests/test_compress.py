"""Temporal token compression (``stab.merge_keep``, ``stab.temporal_pool``): the batched implementation
equals a plain loop over each video's frames, token counts are known before it runs and are what the
token budget and the planner count, and with the switches off (or at their no-op values) STAB is
unchanged."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from panda.data.budget import SamplingRule
from panda.data.frames import preprocess_frames
from panda.models.stab import STAB, STABConfig
from panda.tokens import frame_lengths, video_tokens

TINY = dict(width=32, patch_size=7, heads=4, lsd_window=2, chunk_size=2, resolution=56, dropout=0.0)


def video(width, height, frames=6, valid=None, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(valid or frames, height, width, 3), dtype=np.uint8)
    return preprocess_frames(arr, frames, 56, 7)


def batch(*videos):
    return torch.stack([v[0] for v in videos]), torch.stack([v[1] for v in videos])


VIDEOS = dict(mixed=lambda: [video(64, 48, seed=1), video(48, 64, seed=2), video(64, 64, valid=3, seed=3)])


def _stab(**switches):
    torch.manual_seed(0)
    stab = STAB(STABConfig(**TINY, **switches)).eval()
    with torch.no_grad():
        for p in stab.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.1)
    return stab


def _frames(out):
    """[video][frame] token tensors of a STAB output, with each frame's grid."""
    per = out.per_frame()
    F_ = out.lengths.shape[1]
    return [[(t, out.grids[b * F_ + f]) for f, t in enumerate(frames)] for b, frames in enumerate(per)]


def _split(t, grid, ctx=True, row=True):
    rows, cols = grid
    body = t[int(ctx):].view(rows, cols + int(row), -1)
    return t[:int(ctx)], body[:, :cols].reshape(rows * cols, -1), body[:, cols:] if row else None


def _join(ctx, spatial_rows, row_tok):
    """ctx (1, d) or empty, spatial_rows: list per row of (k_r, d), row_tok (rows, 1, d) or None."""
    parts = [ctx]
    for r, tokens in enumerate(spatial_rows):
        parts.append(tokens)
        if row_tok is not None:
            parts.append(row_tok[r])
    return torch.cat(parts)


def reference_merge(frames, keep):
    """One video's uncompressed frames [(tokens, grid)] with content -> compressed frames, one token at a time."""
    grid = frames[0][1]
    rows, cols = grid
    P, m = rows * cols, min(rows * cols, max(1, math.ceil(keep * rows * cols)))
    split = [_split(t, g) for t, g in frames]
    x = torch.stack([s for _, s, _ in split])  # (count, P, d)
    anchor, weight, standing = x[0].clone(), [1] * P, [0] * P
    members = {(0, p): [x[0, p]] for p in range(P)}
    kept_in = {0: list(range(P))}
    for f in range(1, len(frames)):
        similarity = F.cosine_similarity(x[f], anchor, dim=-1)
        kept = sorted(similarity.argsort()[:m].tolist())
        kept_in[f] = kept
        for p in range(P):
            if p in kept:
                standing[p], anchor[p], weight[p] = f, x[f, p], 1
                members[(f, p)] = [x[f, p]]
            else:
                members[(standing[p], p)].append(x[f, p])
                anchor[p] = (anchor[p] * weight[p] + x[f, p]) / (weight[p] + 1)
                weight[p] += 1
    out = []
    for f, (ctx, _, row_tok) in enumerate(split):
        rows_tokens = [torch.stack([torch.stack(members[(f, p)]).mean(0) for p in kept_in[f] if p // cols == r])
                       if any(p // cols == r for p in kept_in[f]) else x.new_zeros(0, x.shape[-1]) for r in range(rows)]
        out.append(_join(ctx, rows_tokens, row_tok))
    return out


def reference_pool(frames, k):
    rows, cols = frames[0][1]
    split = [_split(t, g) for t, g in frames]
    out = []
    for f, (ctx, spatial, row_tok) in enumerate(split):
        if f % k:
            out.append(ctx)
            continue
        mean = torch.stack([s for _, s, _ in split[f:f + k]]).mean(0).view(rows, cols, -1)
        out.append(_join(ctx, list(mean), row_tok))
    return out


@pytest.mark.parametrize("switch", [{"merge_keep": 0.25}, {"merge_keep": 0.5}, {"temporal_pool": 2}, {"temporal_pool": 4}])
def test_batched_compression_equals_a_loop_over_each_videos_frames(switch):
    plain, compressed = _stab(), _stab(**switch)
    inputs = batch(*VIDEOS["mixed"]())
    with torch.no_grad():
        before, after = _frames(plain(*inputs)), compressed(*inputs)
    got = after.per_frame()
    for b, frames in enumerate(before):
        real = frames[:3] if b == 2 else frames  # the third video has 3 frames with content, then padding
        expected = reference_merge(real, switch["merge_keep"]) if "merge_keep" in switch else \
            reference_pool(real, switch["temporal_pool"])
        expected += [t for t, _ in frames[len(real):]]  # padding frames keep their tokens
        assert [len(t) for t in got[b]] == [len(t) for t in expected]
        for a, e in zip(got[b], expected):
            assert torch.allclose(a, e, atol=1e-5)
        rows, cols = real[0][1]
        assert after.host_lengths[b, :len(real)].tolist() == frame_lengths(
            len(real), rows, cols, merge_keep=switch.get("merge_keep"), temporal_pool=switch.get("temporal_pool", 1))
    assert np.array_equal(after.lengths.numpy(), after.host_lengths)


@pytest.mark.parametrize("switch", [{"merge_keep": 0.25}, {"temporal_pool": 2}])
def test_a_batch_trains_as_each_video_alone_with_compression(switch):
    stab = _stab(**switch)
    videos = VIDEOS["mixed"]()
    params = list(stab.parameters())
    joint_out = stab(*batch(*videos))
    alone_out = [stab(*batch(v)) for v in videos]
    assert torch.equal(joint_out.lengths, torch.cat([a.lengths for a in alone_out]))
    assert torch.allclose(joint_out.tokens, torch.cat([a.tokens for a in alone_out]), atol=1e-5)
    joint = torch.autograd.grad((joint_out.tokens ** 2).sum(), params, allow_unused=True)
    alone = torch.autograd.grad(sum((a.tokens ** 2).sum() for a in alone_out), params, allow_unused=True)
    for a, b in zip(joint, alone):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("no_op", [{"merge_keep": 1.0}, {"temporal_pool": 1}])
def test_no_op_settings_and_off_leave_stab_unchanged(no_op):
    """merge_keep=1 keeps every token, temporal_pool=1 pools nothing: the same tokens as with the switches
    off (bit for bit), and the switches add no parameter (release weights load the same)."""
    plain, switched = _stab(), _stab(**no_op)
    inputs = batch(*VIDEOS["mixed"]())
    with torch.no_grad():
        a, b = plain(*inputs), switched(*inputs)
    assert torch.equal(a.tokens, b.tokens) and np.array_equal(a.host_lengths, b.host_lengths)
    assert plain.state_dict().keys() == _stab(merge_keep=0.25).state_dict().keys() == _stab(temporal_pool=4).state_dict().keys()
    assert STABConfig().merge_keep is None and STABConfig().temporal_pool == 1


def test_the_token_budget_and_the_planner_count_after_compression():
    """A budget buys more frames with compression; what STAB makes of a video's decoded frames is what the rule
    counted."""
    def rule(**switch):
        cfg = STABConfig(**TINY, **switch)
        return SamplingRule("budget", 6, 1.0, 64, 400, cfg.chunk_size, cfg.resolution, cfg.patch_size, cfg.ratio,
                            cfg.window, cfg.has_context_token, cfg.row_tokens, cfg.fixed_side, cfg.merge_keep,
                            cfg.temporal_pool)

    counts = {name: rule(**s).frame_count(600, 30.0, 48, 64) for name, s in
              [("off", {}), ("merge", {"merge_keep": 0.25}), ("pool", {"temporal_pool": 4})]}
    assert counts["off"] < counts["merge"] and counts["off"] < counts["pool"], counts
    for switch in [{}, {"merge_keep": 0.25}, {"temporal_pool": 2}]:
        stab, r = _stab(**switch), rule(**switch)
        with torch.no_grad():
            out = stab(*batch(video(64, 48, frames=6, valid=4, seed=5)))
        assert int(out.host_lengths[0, :4].sum()) == r.video_tokens(4, 48, 64)  # the 4 decoded frames
        cfg = STABConfig(**TINY, **switch)
        assert cfg.video_tokens(6) == video_tokens(6, 4, 4, True, True, cfg.merge_keep, cfg.temporal_pool)
    assert STABConfig(**TINY).video_tokens(6) == 6 * STABConfig(**TINY).max_tokens_per_frame()


@pytest.mark.parametrize("overrides, message", [
    (["stab.merge_keep=0.5", "stab.temporal_pool=2"], "choose one temporal compression"),
    (["stab.merge_keep=0", ], r"stab.merge_keep=0.0: the fraction"),
    (["stab.temporal_pool=2", "stab.lsd=perceiver"], "stab.lsd=perceiver: temporal compression matches tokens"),
    (["stab.temporal_pool=2", "stab.use_fsra=false", "stab.use_gstra=false"], "keep only their context token"),
])
def test_bad_compression_settings_fail_naming_the_key(overrides, message):
    from conftest import compose
    from panda.config import to_train_config, validate

    with pytest.raises(ValueError, match=message):
        validate(to_train_config(compose(overrides)))


def test_compressed_runs_train_with_the_budget_and_refuse_distillation(synthetic_root, tmp_path):
    from conftest import compose, tiny_overrides
    from panda.config import to_train_config, validate
    from panda.training.run import train

    summary = train(compose(tiny_overrides(synthetic_root, str(tmp_path / "run")) + [
        "stab.merge_keep=0.25", "data.sampling=budget", "data.max_visual_tokens=400", "trainer.max_steps=2",
        "evaluate=false"]))
    assert summary["train/steps"] == 2 and math.isfinite(summary["train/loss_final"])
    from panda.loading import load_model
    from panda.model_card import render_model_card

    card = render_model_card(load_model(summary["checkpoint"]), summary["checkpoint"], str(tmp_path / "export"), "release")
    cfg = STABConfig(width=32, heads=4, resolution=112, merge_keep=0.25)
    assert f"Temporal compression (`stab.merge_keep=0.25`): 4 square frames give {cfg.video_tokens(4)} visual tokens" in card
    with pytest.raises(ValueError, match="a compressed frame's tokens no longer cover the frame"):
        validate(to_train_config(compose(["stab.temporal_pool=2", "teacher=tiny_languagebind"])))
