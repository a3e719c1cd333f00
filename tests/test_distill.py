"""Distillation head (docs/model-reference.md, "Distillation head"), teachers, and distillation
inside a training step."""

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from panda.models.distill import DistillationHead, TeacherFeatures, distillation_loss, picked_layers
from panda.models.teachers import HFVisionTeacher, LanguageBindVideoTeacher, TeacherConfig, build_teacher

TINY_TEACHER = TeacherConfig(kind="languagebind_video", random_init=True, width=32, layers=2, heads=4, intermediate_size=64,
                             image_size=56, patch_size=14, num_frames=8)


def test_picked_layers_follow_the_release_rule():
    assert picked_layers(32, 4) == [32, 28, 24, 20, 16, 12, 8, 4, 0]  # 9 of the 33 hidden states
    assert picked_layers(2, 1) == [2, 1, 0]
    with pytest.raises(ValueError, match="layer_stride"):
        DistillationHead(32, 2, 16, layer_stride=4)


def test_head_computes_the_written_formula_token_by_token():
    torch.manual_seed(0)
    D, t, heads = 12, 8, 2
    head = DistillationHead(D, 4, t, layer_stride=2, heads=heads)  # layers 4, 2, 0
    hidden = torch.randn(5, 3, D)
    got = head(hidden)
    with torch.no_grad():
        for n in range(5):
            normed = [head.norm_layer[j][1](F.layer_norm(hidden[n, j], (D,), head.norm_layer[j][0].weight, head.norm_layer[j][0].bias))
                      for j in range(3)]
            fused = []
            for h in range(heads):
                sl = slice(h * t // heads, (h + 1) * t // heads)
                scores = [float(normed[0][sl] @ normed[k][sl]) / math.sqrt(t) for k in (1, 2)]
                w = torch.softmax(torch.tensor(scores), 0)
                fused.append(w[0] * normed[1][sl] + w[1] * normed[2][sl])
            want = head.input_layer(hidden[n, 0]) + head.output_layer(torch.cat(fused))
            assert torch.allclose(got[n], want, atol=1e-5)


def test_loss_pools_the_finer_grid_and_skips_frames_without_content():
    torch.manual_seed(0)
    head = DistillationHead(8, 2, 4, layer_stride=1, heads=2)
    # frame 0: a 4x4 token grid vs a 2x2 teacher box; frame 1: padding (no content)
    hidden = torch.randn(16 + 4, 3, 8)
    grid = torch.randn(2, 3, 3, 4)
    valid = torch.zeros(2, 3, 3, dtype=torch.bool)
    valid[0, 1:3, 0:2] = True
    teacher = TeacherFeatures(grid, valid)
    loss = distillation_loss(head, hidden, [(4, 4), (2, 2)], torch.tensor([True, False]), teacher, "cosine")
    pred = head(hidden[:16]).view(4, 4, 4).permute(2, 0, 1)
    pooled = F.avg_pool2d(pred[None], 2)[0].permute(1, 2, 0).reshape(4, 4)
    want = 1 - F.cosine_similarity(pooled, grid[0, 1:3, 0:2].reshape(4, 4), dim=-1).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    mse = distillation_loss(head, hidden, [(4, 4), (2, 2)], torch.tensor([True, False]), teacher, "mse")
    assert torch.allclose(mse, (pooled - grid[0, 1:3, 0:2].reshape(4, 4)).pow(2).mean(), atol=1e-6)


def test_languagebind_teacher_is_frozen_and_mixes_frames_within_a_chunk_only():
    torch.manual_seed(0)
    teacher = LanguageBindVideoTeacher(TINY_TEACHER, group=2).freeze()
    for p in teacher.vision_model.encoder.layers[0].temporal_embedding, teacher.vision_model.embeddings.class_embedding:
        p.data.normal_()  # the temporal embedding starts at zero; make the temporal step visible
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    pixels, mask = torch.randn(1, 4, 3, 56, 56), torch.ones(1, 4, 56, 56)
    mask[..., :14, :] = 0  # the top row of patches is padding
    out = teacher(pixels, mask)
    assert out.grid.shape == (4, 4, 4, 32) and not out.grid.requires_grad
    assert out.valid[:, 0].sum() == 0 and out.valid[:, 1:].all()
    changed = pixels.clone()
    changed[0, 0] += 1.0  # frame 0 is in chunk (0, 1)
    again = teacher(changed, mask).grid
    assert not torch.allclose(again[1], out.grid[1])  # temporal attention carries it to frame 1
    assert torch.allclose(again[2:], out.grid[2:])  # but not into the next chunk


def _teacher_folder(folder, num_frames: int) -> str:
    """A LanguageBind-format folder whose config.json says ``num_frames``."""
    torch.manual_seed(2)
    source = LanguageBindVideoTeacher(dataclasses.replace(TINY_TEACHER, num_frames=num_frames))
    for layer in source.vision_model.encoder.layers:
        layer.temporal_embedding.data.normal_()
    os.makedirs(folder, exist_ok=True)
    torch.save(source.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "image_size": 56, "patch_size": 14, "hidden_act": "gelu", "num_frames": num_frames}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"vision_config": vision}, f)
    return folder


@pytest.mark.parametrize("num_frames", [8, 4])
def test_languagebind_teacher_groups_frames_by_its_checkpoints_num_frames(tmp_path, num_frames):
    """The release's teacher (docs/model-reference.md, "Teachers") attends over the checkpoint's
    num_frames consecutive frames of one video (all 8 of an 8-frame video), not over STAB's 4-frame
    chunks."""
    teacher = build_teacher(TeacherConfig(kind="languagebind_video", path=_teacher_folder(tmp_path / "lb", num_frames)))
    assert teacher.group == num_frames
    pixels, mask = torch.randn(1, 8, 3, 56, 56), torch.ones(1, 8, 56, 56)
    base = teacher(pixels, mask).grid
    changed = pixels.clone()
    changed[0, 6] += 1.0
    moved = teacher(changed, mask).grid
    assert not torch.allclose(moved[4:6], base[4:6])  # frame 6 reaches frames 4, 5 either way
    if num_frames == 8:
        assert not torch.allclose(moved[1], base[1])  # ... and frame 1: one group of 8
    else:
        assert torch.allclose(moved[:4], base[:4])  # ... but never crosses frame 3/4: groups of 4
    # a 4-frame video is one group; the explicit override splits it
    short = build_teacher(TeacherConfig(kind="languagebind_video", path=str(tmp_path / "lb"), chunk_size=2))
    assert short.group == 2
    with pytest.raises(ValueError, match="teacher.chunk_size"):
        short(torch.randn(1, 3, 3, 56, 56), torch.ones(1, 3, 56, 56))


def test_languagebind_teacher_loads_release_key_names_and_skips_other_towers(tmp_path):
    torch.manual_seed(1)
    source = LanguageBindVideoTeacher(TINY_TEACHER)
    state = dict(source.state_dict())
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 32)
    state["logit_scale"] = torch.tensor(1.0)
    torch.save(state, tmp_path / "pytorch_model.bin")
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "image_size": 56, "patch_size": 14, "hidden_act": "gelu", "num_frames": 8}
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": vision}))
    loaded = build_teacher(TeacherConfig(kind="languagebind_video", path=str(tmp_path)))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    del state["vision_model.encoder.layers.1.temporal_attn.q_proj.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match="temporal_attn"):
        build_teacher(TeacherConfig(kind="languagebind_video", path=str(tmp_path)))


def test_hf_clip_vision_model_from_a_local_folder_is_a_teacher(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=56, patch_size=14)
    CLIPVisionModel(cfg).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    teacher = build_teacher(TeacherConfig(kind="hf_vision", path=str(tmp_path)))
    assert isinstance(teacher, HFVisionTeacher) and (teacher.width, teacher.image_size, teacher.patch_size) == (32, 56, 14)
    pixels = torch.randn(2, 2, 3, 56, 56)
    out = teacher(pixels, torch.ones(2, 2, 56, 56))
    assert out.grid.shape == (4, 4, 4, 32)
    # its own normalisation is applied, and the second-to-last hidden state is used, CLS dropped
    raw = (pixels * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
           + torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1) - 0.5) / 0.5
    want = CLIPVisionModel.from_pretrained(tmp_path)(pixel_values=raw.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(out.grid, want[:, 1:].reshape(4, 4, 4, 32), atol=1e-5)


def test_teacher_none_and_missing_folder():
    assert build_teacher(TeacherConfig(kind="none")) is None
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_teacher(TeacherConfig(kind="languagebind_video", path="/no/such/folder"))
    with pytest.raises(ValueError, match="teacher.kind"):
        build_teacher(TeacherConfig(kind="clip"))


def test_training_with_a_teacher_logs_both_losses_and_trains_the_head(synthetic_root, tmp_path):
    from conftest import compose, tiny_overrides

    from panda.training.run import train

    run_dir = str(tmp_path / "run")
    cfg = compose(tiny_overrides(synthetic_root, run_dir) + [
        "teacher=tiny_languagebind", "distill.layer_stride=1", "distill.heads=4", "trainer.max_steps=3",
        "trainer.log_every_n_steps=1", "logger=csv", "evaluate=false",
    ])
    summary = train(cfg)
    assert summary["params/distill_head"] > 0 and summary["trainable/distill_head"] == summary["params/distill_head"]
    import csv

    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/distill_loss")]
    assert len(rows) == 3
    for r in rows:  # loss = lm + 1.0 * distill, each logged on its own
        assert math.isclose(float(r["train/loss"]), float(r["train/lm_loss"]) + float(r["train/distill_loss"]), rel_tol=1e-5)
        assert 0.0 < float(r["train/distill_loss"]) < 2.0  # 1 - cos lies in [0, 2]
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("model.distill_head.") for k in keys)
    assert not any("teacher" in k for k in keys)  # the frozen teacher is never saved
    assert ckpt["hyper_parameters"]["derived"]["teacher_width"] == 32  # the loaded teacher's width, kept apart from the config


def test_distill_off_builds_no_head_and_loads_no_teacher(synthetic_root, tmp_path):
    from conftest import compose, tiny_overrides

    from panda.training.run import train

    cfg = compose(tiny_overrides(synthetic_root, str(tmp_path / "run")) + [
        "teacher=tiny_languagebind", "distill.loss=off", "debug=fast_dev_run", "evaluate=false"])
    summary = train(cfg)
    assert summary["params/distill_head"] == 0 and "trainable/distill_head" not in summary


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_other_hf_vision_families_drop_their_prefix_tokens(tmp_path, family):
    import transformers

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14)
    if family == "siglip":  # no CLS token
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**sizes)).save_pretrained(tmp_path)
        prefix = 0
    else:  # CLS + 2 register tokens
        transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=2, **sizes)).save_pretrained(tmp_path)
        prefix = 3
    teacher = build_teacher(TeacherConfig(kind="hf_vision", path=str(tmp_path)))
    pixels = torch.randn(1, 2, 3, 56, 56)
    out = teacher(pixels, torch.ones(1, 2, 56, 56))
    assert out.grid.shape == (2, 4, 4, 32)
    hidden = teacher.model(pixel_values=pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == prefix + 16
    assert torch.allclose(out.grid, hidden[:, prefix:].reshape(2, 4, 4, 32))


def test_spatial_index_skips_context_and_row_tokens():
    from panda.models.stab import VisualTokens

    visual = VisualTokens(torch.zeros(13, 1), torch.tensor([[9, 4]]), [(2, 3), (1, 2)], torch.tensor([True, True]))
    assert visual.spatial_index(True, True).tolist() == [1, 2, 3, 5, 6, 7, 10, 11]
    bare = VisualTokens(torch.zeros(8, 1), torch.tensor([[6, 2]]), [(2, 3), (1, 2)], torch.tensor([True, True]))
    assert bare.spatial_index(False, False).tolist() == list(range(8))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_the_hidden_states_the_head_reads_are_kept_with_the_same_loss_and_gradients(family):
    """The LLM is asked for the picked layers only: LLaMA-family models return None for
    the others (so a no-grad pass frees them), and the loss and every gradient equal those of the
    pass that keeps all L + 1 hidden states."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from panda.models.distill import DistillConfig
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.manual_seed(0)
    vocab, F_, r = 64, 2, 56
    if family == "gpt2":
        llm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=512))
    else:
        llm = build_llm(vocab, hidden_size=32, layers=4, heads=4, intermediate_size=64)
    model = VideoLanguageModel(STABConfig(width=32, patch_size=7, heads=4, chunk_size=2, resolution=r, dropout=0.0), llm,
                               distill=DistillConfig(layer_stride=2, heads=2), teacher_width=16).eval()
    assert model.distill_head.layers == [4, 2, 0]
    ids = torch.randint(3, vocab, (2, 12))
    ids[:, 1:1 + F_] = -200
    labels = ids.clone()
    labels[:, :8] = -100
    pixels, mask = torch.randn(2, F_, 3, r, r), torch.ones(2, F_, r, r)
    teacher = TeacherFeatures(torch.randn(2 * F_, 4, 4, 16), torch.ones(2 * F_, 4, 4, dtype=torch.bool))
    decoder = getattr(model.llm, model.llm.base_model_prefix)
    original, seen = decoder.forward, {}

    def recording(*args, **kwargs):
        seen["request"] = kwargs.get("output_hidden_states")
        out = original(*args, **kwargs)
        seen["hidden"] = out.hidden_states
        return out

    decoder.forward = recording
    ours = model(ids, torch.ones_like(ids), pixels, mask, labels, teacher=teacher)
    grads = torch.autograd.grad(ours.loss, list(model.parameters()), allow_unused=True)
    assert seen["request"] == [4, 2, 0]
    assert len(seen["hidden"]) == 5 and all(seen["hidden"][j] is not None for j in (4, 2, 0))
    if family == "llama":
        assert seen["hidden"][1] is None and seen["hidden"][3] is None

    decoder.forward = lambda *args, **kwargs: original(*args, **{**kwargs, "output_hidden_states": True})
    full = model(ids, torch.ones_like(ids), pixels, mask, labels, teacher=teacher)
    want = torch.autograd.grad(full.loss, list(model.parameters()), allow_unused=True)
    assert full.distill_loss is not None and torch.equal(ours.distill_loss, full.distill_loss)
    assert torch.equal(ours.loss, full.loss)
    for g, w in zip(grads, want):
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w))
