import pytest
import torch

from torch import nn

from panda.models.checkpoints import CheckpointKeyError, apply_release_state, panda_to_release
from panda.models.stab import STAB, STABConfig, build_projector

# the release's names and shapes at d = 1024, D = 4096 (docs/model-reference.md, "STAB parameter names")
RELEASE_SHAPES = {
    "model.video_tower.class_embedding": (1024,),
    "model.video_tower.split_embedding": (1024,),
    "model.video_tower.temporal_cls_token": (1, 1, 1024),
    "model.video_tower.balance": (1024,),
    "model.video_tower.patch_embedding.weight": (1024, 3, 14, 14),
    "model.video_tower.lmhra1.pos_embed.0.running_var": (1024,),
    "model.video_tower.lmhra1.pos_embed.0.num_batches_tracked": (),
    "model.video_tower.lmhra1.pos_embed.1.weight": (682, 1024, 1, 1, 1),
    "model.video_tower.lmhra1.pos_embed.2.weight": (682, 1, 3, 1, 1),
    "model.video_tower.lmhra1.pos_embed.3.weight": (1024, 682, 1, 1, 1),
    "model.video_tower.dpe.weight": (1024, 1, 3, 3, 3),
    "model.video_tower.dec.attn.in_proj_weight": (3072, 1024),
    "model.video_tower.dec.attn.out_proj.bias": (1024,),
    "model.video_tower.dec.ln_1.weight": (1024,),
    "model.video_tower.dec.ln_2.weight": (1024,),
    "model.video_tower.dec.ln_3.weight": (1024,),
    "model.video_tower.dec.mlp.c_fc.weight": (4096, 1024),
    "model.video_tower.dec.mlp.c_proj.weight": (1024, 4096),
    "model.video_tower.proj.0.weight": (1024,),
    "model.video_tower.proj.2.weight": (1024, 1024),
    "model.video_tower.local_attention.q.0.weight": (1024,),
    "model.video_tower.local_attention.q.1.weight": (1024, 1024),
    "model.video_tower.local_attention.kv.1.weight": (2048, 1024),
    "model.video_tower.local_attention.proj.bias": (1024,),
    "model.video_tower.global_attention.q.1.weight": (1024, 1024),
    "model.video_tower.global_attention.kv.1.weight": (2048, 1024),
    "model.video_tower.global_attention.proj.weight": (1024, 1024),
    "model.video_projector.0.weight": (4096, 1024),
    "model.video_projector.2.weight": (4096, 4096),
}


@pytest.fixture(scope="module")
def release_state():
    """A release-format state dict of random tensors, plus the unused lmhra2 block."""
    torch.manual_seed(0)
    stab, proj = STAB(STABConfig()), build_projector("mlp2x_gelu", 1024, 4096)
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v for k, v in panda_to_release(stab, proj).items()}
    for i in range(4):
        w = state[f"model.video_tower.lmhra1.pos_embed.{i}.weight"]
        state[f"model.video_tower.lmhra2.pos_embed.{i}.weight"] = torch.randn_like(w)
    return state


def test_panda_names_map_to_the_release_names_and_shapes(release_state):
    for key, shape in RELEASE_SHAPES.items():
        assert key in release_state, key
        assert tuple(release_state[key].shape) == shape, key


def vision_parts(stab, proj) -> nn.Module:
    parts = nn.Module()
    parts.stab, parts.projector, parts.distill_head = stab, proj, None
    return parts


def load_release_vision(stab, proj, state, strict=True):
    return apply_release_state(vision_parts(stab, proj), state, strict=strict)


def test_release_round_trip_restores_every_tensor(release_state):
    stab, proj = STAB(STABConfig()), build_projector("mlp2x_gelu", 1024, 4096)
    report = load_release_vision(stab, proj, release_state)
    assert not report.missing and not report.unexpected
    assert sorted(report.unused) == sorted(k for k in release_state if ".lmhra2." in k)
    back = panda_to_release(stab, proj)
    assert set(back) == {k for k in release_state if ".lmhra2." not in k}
    for key, value in back.items():
        assert torch.equal(value, release_state[key]), key


def test_missing_key_is_an_error_naming_it(release_state):
    broken = dict(release_state)
    del broken["model.video_tower.dpe.weight"]
    stab, proj = STAB(STABConfig()), build_projector("mlp2x_gelu", 1024, 4096)
    with pytest.raises(CheckpointKeyError, match=r"model\.video_tower\.dpe\.weight"):
        load_release_vision(stab, proj, broken)


def test_ablated_model_reports_unexpected_release_keys(release_state):
    stab, proj = STAB(STABConfig(use_gstra=False)), build_projector("mlp2x_gelu", 1024, 4096)
    with pytest.raises(CheckpointKeyError, match=r"dec\.attn\.in_proj_weight"):
        load_release_vision(stab, proj, release_state)
    report = load_release_vision(stab, proj, release_state, strict=False)
    assert "model.video_tower.temporal_cls_token" in report.unexpected


@pytest.mark.parametrize("switch", ["half_res_no_lsd", "perceiver"])
def test_table9_switches_load_the_release_keys_they_share_and_skip_the_lsd(release_state, switch):
    cfg = {"half_res_no_lsd": STABConfig(resolution=224, ratio=1, lsd="none"), "perceiver": STABConfig(lsd="perceiver")}[switch]
    stab, proj = STAB(cfg), build_projector("mlp2x_gelu", 1024, 4096)
    with pytest.raises(CheckpointKeyError, match=r"local_attention"):
        load_release_vision(stab, proj, release_state)  # strict: the release's LSD has nowhere to go
    report = load_release_vision(stab, proj, release_state, strict=False)
    lsd_keys = {k for k in release_state if ".local_attention." in k}
    assert lsd_keys and set(report.unexpected) == lsd_keys
    # PR's resampler is new (no release tensor); half resolution w/o LSD has every other part
    expect_missing = {k for k in panda_to_release(stab) if ".perceiver_resampler." in k}
    assert set(report.missing) == expect_missing and bool(expect_missing) == (switch == "perceiver")
    back = panda_to_release(stab, proj)
    for key in report.loaded:
        assert torch.equal(back[key], release_state[key]), key
    assert len(report.loaded) == len(release_state) - len(lsd_keys) - len(report.unused)
