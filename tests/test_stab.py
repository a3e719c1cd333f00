import importlib.util
import os
import numpy as np
import pytest
import torch

from panda.data.frames import preprocess_frames
from panda.models.stab import STAB, STABConfig, QueryAttentionPool, count_parameters, build_projector, crop_boxes

TINY = dict(width=32, patch_size=7, heads=4, lsd_window=2, chunk_size=2, resolution=56, dropout=0.0)
# the per-frame reference forward, as the official code is written: beside the benchmarks that time it, not in panda
STAB_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "stab_reference.py")


def looped_stab_forward(stab, pixels, mask):
    spec = importlib.util.spec_from_file_location("stab_reference", STAB_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.looped_stab_forward(stab, pixels, mask)


def video(width, height, frames=4, valid=None, seed=0, resolution=56, patch=7):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(valid or frames, height, width, 3), dtype=np.uint8)
    return preprocess_frames(arr, frames, resolution, patch)


def batch(*videos):
    return torch.stack([v[0] for v in videos]), torch.stack([v[1] for v in videos])


def test_release_sizes_give_273_tokens_square_and_154_for_16_9():
    # release geometry (448 px, patch 14, LSD 2) at a narrow width to keep the test fast
    cfg = STABConfig(width=32, heads=8)
    stab = STAB(cfg).eval()
    square = video(300, 300, frames=8, resolution=448, patch=14)
    wide = video(1280, 720, frames=8, resolution=448, patch=14)
    with torch.no_grad():
        out = stab(*batch(square, wide))
    assert out.lengths[0].tolist() == [273] * 8
    assert out.lengths[1].tolist() == [154] * 8
    assert out.tokens.shape == (8 * 273 + 8 * 154, 32)
    assert cfg.max_tokens_per_frame() == 273


def test_release_parameter_counts_match_the_paper():
    stab = STAB(STABConfig())
    assert count_parameters(stab) == 24_086_866  # ~24.1M without the unused lmhra2 block
    assert count_parameters(build_projector("mlp2x_gelu", 1024, 4096)) == 20_979_712  # ~21.0M


def test_padding_frames_get_zero_mask_and_pixels():
    pixels, mask = video(64, 48, frames=4, valid=2)
    assert mask[:2].sum() > 0 and mask[2:].sum() == 0
    assert pixels[2:].abs().sum() == 0


def test_padding_frame_is_cropped_to_top_left_half_grid():
    valid = np.zeros((2, 8, 8), dtype=bool)
    valid[0, 2:6, 0:8] = True
    assert crop_boxes(valid).tolist() == [[2, 0, 4, 8], [0, 0, 4, 4]]


def test_zero_initialised_parts_start_as_identity():
    torch.manual_seed(0)
    stab = STAB(STABConfig(**TINY))
    x = torch.randn(2, 32, 2, 8, 8)
    assert torch.count_nonzero(stab.lste.temporal_mixer(x)) == 0
    assert torch.count_nonzero(stab.gstra.query) == 0
    assert torch.count_nonzero(stab.gstra.mlp(torch.randn(3, 32))) == 0
    assert torch.count_nonzero(stab.gstra.attn.out_proj.bias) == 0
    assert torch.count_nonzero(stab.lste.position_encoding.bias) == 0
    assert torch.allclose(torch.sigmoid(stab.fusion_logit), torch.full((32,), 0.5))


def test_lsd_and_fsra_scale_by_full_width_not_head_width():
    torch.manual_seed(0)
    pool = QueryAttentionPool(32, heads=4)
    q, tokens = torch.randn(3, 32), torch.randn(3, 5, 32)
    qh = pool.query_proj(q).view(3, 4, 8)
    k, v = pool.kv_proj(tokens).view(3, 5, 2, 4, 8).unbind(2)
    weights = torch.softmax(torch.einsum("nhc,nlhc->nhl", qh, k) * 32**-0.5, dim=-1)
    expected = q + pool.out_proj(torch.einsum("nhl,nlhc->nhc", weights, v).reshape(3, 32))
    assert torch.allclose(pool(q, tokens), expected, atol=1e-5)
    wrong = torch.softmax(torch.einsum("nhc,nlhc->nhl", qh, k) * 8**-0.5, dim=-1)
    assert not torch.allclose(weights, wrong)


def test_batch_equals_each_video_alone():
    torch.manual_seed(0)
    stab = STAB(STABConfig(**TINY)).eval()
    videos = [video(64, 48, seed=1), video(48, 64, seed=2), video(64, 64, valid=1, seed=3)]
    with torch.no_grad():
        joint = stab(*batch(*videos))
        alone = [stab(*batch(v)) for v in videos]
    assert torch.equal(joint.lengths, torch.cat([a.lengths for a in alone]))
    assert torch.allclose(joint.tokens, torch.cat([a.tokens for a in alone]), atol=1e-5)


ABLATIONS = {  # name -> STABConfig overrides
    "use_fsra": {"use_fsra": False},
    "use_gstra": {"use_gstra": False},
    "use_lste": {"use_lste": False},
    "row_tokens": {"row_tokens": False},
    "lsd_avgpool": {"lsd": "avgpool"},
    "lsd_before_lste": {"lsd_before_lste": True},
    "lsd_none": {"lsd": "none"},  # Table 9's half resolution w/o LSD (here at the same resolution)
    "perceiver": {"lsd": "perceiver"},  # Table 9's w/o LSD (PR)
}
REMOVES = {
    "use_fsra": {"frame_query", "fsra.", "fusion_logit"},
    "use_gstra": {"gstra.", "fusion_proj.", "fusion_logit"},
    "use_lste": {"lste."},
    "row_tokens": {"row_token"},
    "lsd_avgpool": {"lsd.attend."},
    "lsd_before_lste": set(),  # same parameters, different order of computation
    "lsd_none": {"lsd.attend."},
    "perceiver": {"lsd.attend."},
}
ADDS = {"perceiver": {"resampler."}}


@pytest.mark.parametrize("switch", list(ABLATIONS))
def test_each_ablation_changes_outputs_and_parameters(switch):
    inputs = batch(video(64, 48, seed=1), video(64, 64, seed=2))
    torch.manual_seed(0)
    full = STAB(STABConfig(**TINY)).eval()
    # perturb the zero-initialised parts so every branch contributes to the output
    with torch.no_grad():
        for name, p in full.named_parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.1)
    ablated = STAB(STABConfig(**(TINY | ABLATIONS[switch]))).eval()
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k in ablated.state_dict()}, strict=not ADDS.get(switch))
    full_names, ablated_names = set(full.state_dict()), set(ablated.state_dict())
    added = ablated_names - full_names
    assert {n.split(".")[0] + "." for n in added} == ADDS.get(switch, set())
    removed = full_names - ablated_names
    for prefix in REMOVES[switch]:
        assert any(n.startswith(prefix) for n in removed), f"{switch} should remove {prefix}*"
    with torch.no_grad():
        a, b = full(*inputs), ablated(*inputs)
    assert a.tokens.shape != b.tokens.shape or not torch.allclose(a.tokens, b.tokens, atol=1e-4)


def test_no_temporal_and_single_frame_chunks_skip_lste_and_gstra():
    for cfg in (TINY | {"use_lste": False, "use_gstra": False}, TINY | {"chunk_size": 1}):
        stab = STAB(STABConfig(**cfg))
        assert stab.lste is None and stab.gstra is None and stab.fusion_proj is None
        out = stab(*batch(video(64, 64, frames=2)))
        assert out.lengths.tolist() == [[21, 21]]  # context from FSRA + 4 rows of (4 + 1)


def _count_ops(stab, inputs) -> int:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        stab(*inputs)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_op_count_does_not_grow_with_frames_or_videos():
    stab = STAB(STABConfig(**TINY)).eval()
    small = batch(video(64, 48, frames=2))
    large = batch(*[video(64, 48, frames=8, seed=i) for i in range(3)])
    n_small, n_large = _count_ops(stab, small), _count_ops(stab, large)
    # 1 video x 2 frames vs 3 videos x 8 frames: a per-frame loop would launch ~12x the ops
    assert n_large <= n_small * 1.05, (n_small, n_large)


def test_a_batch_of_mixed_aspect_ratios_trains_as_each_video_alone():
    torch.manual_seed(0)
    stab = STAB(STABConfig(**{**TINY, "dropout": 0.0})).eval()  # eval: batch norm uses running statistics
    with torch.no_grad():
        for p in stab.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.1)
    videos = [video(64, 48, seed=1), video(48, 64, seed=2), video(64, 64, seed=3)]
    params = list(stab.parameters())
    joint = torch.autograd.grad((stab(*batch(*videos)).tokens ** 2).sum(), params, allow_unused=True)
    alone = torch.autograd.grad(sum((stab(*batch(v)).tokens ** 2).sum() for v in videos), params, allow_unused=True)
    for a, b in zip(joint, alone):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_op_count_does_not_grow_with_the_number_of_aspect_ratios():
    stab = STAB(STABConfig(**TINY)).eval()
    one_shape = batch(*[video(64, 48, frames=4, seed=i) for i in range(3)])
    three = batch(video(64, 48, frames=4, seed=1), video(48, 64, frames=4, seed=2), video(64, 64, frames=4, seed=3))
    six = batch(*[video(w, h, frames=4, seed=i) for i, (w, h) in
                  enumerate([(64, 48), (48, 64), (64, 64), (64, 36), (36, 64), (64, 56)])])
    n_one, n_three, n_six = _count_ops(stab, one_shape), _count_ops(stab, three), _count_ops(stab, six)
    # a loop per crop shape would add ~a hundred ops per extra shape; all shapes go through one path
    assert n_three == n_six, (n_three, n_six)
    assert n_three <= n_one * 1.25, (n_one, n_three)


@pytest.mark.parametrize("switch", [None] + list(ABLATIONS))
def test_batched_forward_matches_the_per_frame_reference(switch):
    torch.manual_seed(0)
    cfg = TINY | (ABLATIONS[switch] if switch else {})
    stab = STAB(STABConfig(**cfg)).eval()
    with torch.no_grad():
        for p in stab.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.1)
    inputs = batch(video(64, 48, seed=1), video(48, 64, seed=2), video(64, 64, valid=1, seed=3))
    with torch.no_grad():
        fast, slow = stab(*inputs), looped_stab_forward(stab, *inputs)
    assert torch.equal(fast.lengths, slow.lengths)
    assert torch.allclose(fast.tokens, slow.tokens, atol=1e-5)


def test_gstra_attention_equals_torch_multihead_attention_with_the_same_weights():
    # the release's GSTRA is an nn.MultiheadAttention; panda's packed version must compute the same
    from panda.models.stab import PackedCrossAttention

    torch.manual_seed(0)
    ours, reference = PackedCrossAttention(32, 4), torch.nn.MultiheadAttention(32, 4, batch_first=True)
    reference.load_state_dict(ours.state_dict())
    q, kv = torch.randn(3, 1, 32), torch.randn(3, 50, 32)
    assert torch.allclose(ours(q, kv), reference(q, kv, kv, need_weights=False)[0], atol=1e-6)


def test_table9_switches_give_the_token_counts_they_should():
    # PR: every frame, whatever its shape, gets the square frame's LSD grid of latents (4x4 at 56 px / 7 px / 2)
    pr = STAB(STABConfig(**(TINY | {"lsd": "perceiver"}))).eval()
    lsd = STAB(STABConfig(**TINY)).eval()
    inputs = batch(video(64, 32, seed=1), video(64, 64, seed=2))
    with torch.no_grad():
        out_pr, out_lsd = pr(*inputs), lsd(*inputs)
    assert out_lsd.lengths[:, 0].tolist() == [1 + 2 * 5, 1 + 4 * 5]  # 64x32 -> 2 rows of 4 (+ row token)
    assert out_pr.lengths.tolist() == [[1 + 4 * 5] * 4] * 2
    assert out_pr.grids == [(4, 4)] * 8
    # half resolution without LSD (stab.ratio=1): as many tokens as full resolution with LSD, no LSD weights
    half_cfg = STABConfig(**(TINY | {"resolution": 28, "ratio": 1, "lsd": "none"}))
    half = STAB(half_cfg).eval()
    assert not list(half.lsd.parameters()) and half_cfg.max_tokens_per_frame() == STABConfig(**TINY).max_tokens_per_frame()
    with torch.no_grad():
        out_half = half(*batch(video(64, 64, seed=2, resolution=28), video(64, 32, seed=1, resolution=28)))
    assert out_half.lengths[:, 0].tolist() == [1 + 4 * 5, 1 + 2 * 5]


def test_perceiver_padding_patches_do_not_change_a_frames_tokens():
    # the resampler's key mask: a 64x32 video's tokens do not depend on what lies in the padding
    torch.manual_seed(0)
    pr = STAB(STABConfig(**(TINY | {"lsd": "perceiver", "use_lste": False, "use_gstra": False}))).eval()
    pixels, mask = batch(video(64, 32, seed=1))
    noisy = torch.where(mask[:, :, None].bool(), pixels, torch.randn_like(pixels))
    with torch.no_grad():
        assert torch.allclose(pr(pixels, mask).tokens, pr(noisy, mask).tokens, atol=1e-6)
        assert not torch.allclose(pr(noisy, torch.ones_like(mask)).tokens, pr(pixels, mask).tokens, atol=1e-3)


@pytest.mark.parametrize("experiment", ["ablation/perceiver", "ablation/half_res_no_lsd"])
def test_table9_experiments_train_evaluate_and_save_through_the_whole_model(synthetic_root, tmp_path, experiment):
    from conftest import train_tiny

    summary = train_tiny(synthetic_root, tmp_path, f"experiment={experiment}", "trainer.max_steps=2")
    assert summary["train/steps"] == 2 and summary["eval/num_questions"] > 0
    assert os.path.exists(summary["checkpoint"])
