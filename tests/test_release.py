"""Release-style folders in and out, EVE initialisation, the three-stage recipe chained at tiny
size, and ``python -m panda.chat``. Folders are written here in the release key format
(``write_release_folder``), independently of panda's exporter."""

import json
import os

import pytest
import torch
from conftest import compose, run_cli, tiny_video_lm, write_release_folder

from panda.data.tokenizer import load_tokenizer, save_tokenizer
from panda.models.checkpoints import (
    CheckpointKeyError,
    NotACheckpointError,
    apply_eve_state,
    export_release,
    export_trainable,
    load_release,
    model_meta,
    read_file_weights,
    read_weights,
)
from panda.models.stab import STABConfig


def _inputs(tokenizer, frames=4, seed=0):
    from panda.data.conversation import get_template, tokenize_prompt

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, frames, 3, 112, 112, generator=g)
    mask = torch.ones(2, frames, 112, 112)
    mask[1, :, :28] = 0  # a letterboxed video: fewer rows of tokens
    ids = tokenize_prompt(tokenizer, get_template("vicuna_v1_eval"), "what colour is it?", frames)
    ids = ids[None].repeat(2, 1)
    return ids, torch.ones_like(ids), pixels, mask


def _outputs(model, tokenizer):
    ids, attn, pixels, mask = _inputs(tokenizer)
    with torch.no_grad():
        visual = model.encode_video(pixels, mask)
        logits = model(ids, attn, pixels, mask).logits
    return visual, logits


@pytest.fixture(scope="module")
def source_model(tokenizer):
    return tiny_video_lm(tokenizer, teacher_width=16, seed=3)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_release_reads_sharded_folders_and_reproduces_the_model(source_model, tokenizer, tmp_path, fmt):
    extra = {"model.video_tower.lmhra2.pos_embed.1.weight": torch.randn(21, 32, 1, 1, 1),
             "model.video_teacher.video_tower.encoder.layers.0.mlp.fc1.weight": torch.randn(8, 8)}
    folder = write_release_folder(source_model, str(tmp_path / "release"), tokenizer, shards=3, fmt=fmt, extra=extra)
    meta = model_meta(source_model, frames=4)
    with open(os.path.join(folder, "panda.json"), "w") as f:  # the tiny STAB's sizes (else: the release's)
        json.dump(meta, f)
    model, report = load_release(folder)
    tok = load_tokenizer(folder)
    assert tok is not None and len(tok) == len(tokenizer)
    assert not report.missing and not report.unexpected
    assert sorted(report.unused) == sorted(extra)
    assert model.distill_head is not None and model.distill_head.layers == [2, 1, 0]
    want_visual, want_logits = _outputs(source_model, tokenizer)
    got_visual, got_logits = _outputs(model, tokenizer)
    assert torch.equal(got_visual.lengths, want_visual.lengths)
    assert torch.equal(got_visual.tokens, want_visual.tokens)
    assert torch.equal(got_logits, want_logits)
    # encode_video gives each frame's tokens: context, then rows each closed by its row token
    frames = got_visual.per_frame()
    assert len(frames) == 2 and len(frames[0]) == 4
    assert frames[0][0].shape == (1 + 4 * 5, 32) and frames[1][0].shape == (1 + 3 * 5, 32)


def test_missing_or_unexpected_release_keys_are_errors_naming_them(source_model, tokenizer, tmp_path):
    folder = write_release_folder(source_model, str(tmp_path / "a"), tokenizer,
                                  drop=["model.video_tower.dec.ln_3.weight"])
    with open(os.path.join(folder, "panda.json"), "w") as f:
        json.dump(model_meta(source_model), f)
    with pytest.raises(CheckpointKeyError, match=r"model\.video_tower\.dec\.ln_3\.weight"):
        load_release(folder)
    folder = write_release_folder(source_model, str(tmp_path / "b"), tokenizer,
                                  extra={"model.video_tower.new_block.weight": torch.zeros(3)})
    with open(os.path.join(folder, "panda.json"), "w") as f:
        json.dump(model_meta(source_model), f)
    with pytest.raises(CheckpointKeyError, match=r"new_block"):
        load_release(folder)
    with pytest.raises(NotACheckpointError, match="holds no weights"):
        load_release(str(tmp_path))


def test_export_round_trip_and_the_llm_loads_with_automodel(source_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = save_tokenizer(tokenizer, export_release(source_model, str(tmp_path / "export"), model_meta(source_model, frames=4)))
    llm = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(llm(ids).logits, source_model.llm(ids).logits)
    model, report = load_release(out)
    assert not report.missing and not report.unexpected
    want_visual, want_logits = _outputs(source_model, tokenizer)
    got_visual, got_logits = _outputs(model, tokenizer)
    assert torch.equal(got_visual.tokens, want_visual.tokens) and torch.equal(got_logits, want_logits)

    small = export_trainable(source_model, str(tmp_path / "trainable.safetensors"))
    state = read_file_weights(small)
    assert all(k.startswith(("model.video_tower.", "model.video_projector.", "model.video_tower_compressor.")) for k in state)
    n_params = sum(v.numel() for v in state.values())
    expected = sum(p.numel() for m in (source_model.stab, source_model.projector, source_model.distill_head) for p in m.parameters())
    assert n_params >= expected and not any(k.startswith("model.layers.") for k in state)
    fresh = tiny_video_lm(tokenizer, teacher_width=16, seed=9)
    from panda.models.checkpoints import apply_release_state

    apply_release_state(fresh, state)
    with torch.no_grad():
        ids, attn, pixels, mask = _inputs(tokenizer)
        assert torch.equal(fresh.encode_video(pixels, mask).tokens, model.encode_video(pixels, mask).tokens)


def test_eve_init_loads_the_shared_parts_and_leaves_the_rest_fresh(source_model, tokenizer, tmp_path):
    folder = write_release_folder(source_model, str(tmp_path / "eve"), tokenizer, flavour="eve", model_type="eve")
    state = read_weights(folder)
    assert not any(k.startswith("model.video_tower.") for k in state)
    student = tiny_video_lm(tokenizer, teacher_width=16, seed=11)
    before = {k: v.clone() for k, v in student.stab.state_dict().items()}
    apply_eve_state(student, state)
    src = source_model.stab.state_dict()
    for key, value in student.stab.state_dict().items():
        shared = key.startswith(("patch_embed.", "frame_query", "row_token", "lsd.", "fsra."))
        assert torch.equal(value, src[key] if shared else before[key]), key
    assert all(torch.equal(a, b) for a, b in zip(student.projector.parameters(), source_model.projector.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(student.distill_head.parameters(), source_model.distill_head.parameters()))
    del state["model.vision_tower.global_attention.proj.weight"]
    with pytest.raises(CheckpointKeyError, match="global_attention.proj.weight"):
        apply_eve_state(tiny_video_lm(tokenizer, teacher_width=16), state)


def test_global_batch_is_the_one_knob():
    from panda.config import to_train_config
    from panda.training.trainer import resolve_accumulation

    geometry = ["trainer=gpu", "trainer.devices=4", "trainer.num_nodes=16", "data.batch_size=8"]
    cfg = to_train_config(compose([*geometry, "trainer.global_batch_size=2048"]))
    assert resolve_accumulation(cfg) == 4  # 2048 = 8 × 4 × 16 × 4
    assert cfg.trainer.accumulate_grad_batches == 1  # derived, never written back into the config
    with pytest.raises(ValueError, match="not a multiple of data.batch_size"):
        resolve_accumulation(to_train_config(compose([*geometry, "trainer.global_batch_size=1000"])))


@pytest.mark.slow
def test_recipe_stages_chain_end_to_end_at_tiny_size(synthetic_root, tokenizer, tmp_path):
    """stage1 (from a fake EVE folder) -> stage2 -> stage3 through train.py, each starting from the
    previous stage's export by the config reference; then chat with the final model."""
    eve = write_release_folder(tiny_video_lm(tokenizer, teacher_width=32, seed=5), str(tmp_path / "eve"), tokenizer,
                               flavour="eve", model_type="eve")
    runs = tmp_path / "runs"
    tiny = ["stab=tiny", "stab.width=32", "teacher=tiny_languagebind", "data=synthetic", f"data.root={synthetic_root}",
            "data.synthetic=null", "data.num_workers=0", "data.batch_size=2", "trainer=cpu", "trainer.max_steps=2",
            "trainer.global_batch_size=4", "trainer.precision=32-true", "trainer.enable_progress_bar=false", "llm.dtype=float32", "teacher.dtype=float32",
            "frames=4", "model.max_length=512", "distill.layer_stride=1", "distill.heads=4", f"runs_root={runs}",
            "logger=csv", "trainer.log_every_n_steps=1"]
    for stage, extra in [("stage1_prealign", [f"init.path={eve}"]), ("stage2_pretrain", []), ("stage3_finetune", [])]:
        proc = run_cli(["train.py", f"experiment=videopanda_7b/{stage}", *tiny, *extra], env={"OMP_NUM_THREADS": "2"})
        summary = json.loads((runs / "videopanda_7b" / stage / "summary.json").read_text())
        assert summary["train/steps"] == 2
        assert "global batch 4 = 2 per device × 1 processes × 2 accumulation" in proc.stdout + proc.stderr
        assert os.path.exists(summary["export"] + "/panda_vision.safetensors")
    root = runs / "videopanda_7b"
    eve_state = read_weights(eve)
    s1 = read_weights(str(root / "stage1_prealign" / "final"))
    s2 = read_weights(str(root / "stage2_pretrain" / "final"))
    # stage 1: LLM frozen, STAB trained; stage 2: everything trains
    assert torch.equal(s1["model.layers.0.mlp.up_proj.weight"], eve_state["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(s1["model.video_tower.patch_embedding.weight"], eve_state["model.vision_tower.patch_embedding.weight"])
    assert not torch.equal(s2["model.layers.0.mlp.up_proj.weight"], s1["model.layers.0.mlp.up_proj.weight"])
    metrics = (root / "stage3_finetune" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/distill_loss" in metrics and "train/lm_loss" in metrics

    # python -m panda.export of the last checkpoint gives the same trainable tensors as the stage's export
    from panda.export import main as export_main

    small = str(tmp_path / "stage3_trainable.safetensors")
    assert export_main([str(root / "stage3_finetune" / "checkpoints" / "last.ckpt"), "--out", small, "--trainable-only"]) == 0
    s3 = read_weights(str(root / "stage3_finetune" / "final"))
    exported = read_file_weights(small)
    assert exported.keys() <= s3.keys() and all(torch.equal(v, s3[k]) for k, v in exported.items())
    assert any(k.startswith("model.video_tower_compressor.") for k in exported)

    video = os.path.join(synthetic_root, "eval", "Synthetic_Zero_Shot_QA", "videos")
    video = os.path.join(video, sorted(os.listdir(video))[0])
    final = str(root / "stage3_finetune" / "final")
    chat = run_cli(["-m", "panda.chat", "--checkpoint", final, "--video", video, "--max-new-tokens", "4", "--no-stream",
                 "What colour is the shape?"], env={"OMP_NUM_THREADS": "2"})
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]
    model, _ = load_release(final)
    tok = load_tokenizer(final)
    from panda.chat import answer

    assert answer(model, tok, video, "What colour is the shape?", 4, "vicuna_v1_eval", 4, stream=False) == chat.stdout.strip()


@pytest.mark.slow
def test_chat_errors_name_the_problem(tmp_path, synthetic_root):
    bad_video = tmp_path / "broken.mp4"
    bad_video.write_bytes(b"\x00garbage" * 10)
    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    proc = run_cli(["-m", "panda.chat", "--checkpoint", str(not_ckpt), "--video", str(bad_video), "q"], check=False)
    assert proc.returncode == 2 and "is not a checkpoint folder" in proc.stderr
    proc = run_cli(["-m", "panda.chat", "--checkpoint", str(not_ckpt), "--video", str(bad_video), "--dtype", "bfloat16",
                    "--attn", "flash_attention_2", "--device", "cpu", "q"], check=False)
    assert proc.returncode == 2 and "flash_attention_2 needs a CUDA GPU" in proc.stderr
    from panda.chat import answer
    from panda.errors import VideoDecodeError

    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        answer(tiny_video_lm(__import__("panda.data.tokenizer", fromlist=["x"]).load_tokenizer(
            os.path.join(synthetic_root, "tokenizer"))), None, str(bad_video), "q", 4, "vicuna_v1_eval", stream=False)


def test_chat_mistakes_get_one_line_errors_not_tracebacks(tiny_checkpoint, synthetic_root, tmp_path, capsys):
    from panda.chat import main as chat_main

    video_dir = os.path.join(synthetic_root, "eval", "Synthetic_Zero_Shot_QA", "videos")
    video = os.path.join(video_dir, sorted(os.listdir(video_dir))[0])
    run_folder = os.path.dirname(os.path.dirname(tiny_checkpoint))
    cases = [
        ([str(tmp_path / "nope.ckpt")], "checkpoint not found"),
        ([run_folder], "is a train.py run folder; pass its checkpoint"),
        ([tiny_checkpoint, "--frames", "6"], "--frames 6: STAB of this checkpoint groups frames in chunks of 4"),
    ]
    for extra, message in cases:
        assert chat_main(["--checkpoint", *extra, "--video", video, "--max-new-tokens", "2", "q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("panda.chat: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def _stab_only_meta(folder, model):
    """panda.json with the tiny STAB's sizes but no head settings: the head's layers must come
    from the release's rule, as for a real release folder."""
    with open(os.path.join(folder, "panda.json"), "w") as f:
        json.dump({k: v for k, v in model_meta(model, frames=4).items() if k != "distill"}, f)


@pytest.mark.parametrize("layers, picked", [(4, [4, 0]), (8, [8, 4, 0])])
def test_the_release_head_reads_every_fourth_layer_whatever_the_depth(tokenizer, tmp_path, layers, picked):
    """Layers L, L-4, ..., 0 (docs/model-reference.md, "Layers and fusion"). Inferring the
    smallest stride that fits the head's size would read [4, 1] and [8, 5, 2] here."""
    from panda.models.distill import DistillConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.manual_seed(4)
    llm = build_llm(tokenizer, hidden_size=32, layers=layers, heads=4, intermediate_size=64)
    source = VideoLanguageModel(STABConfig(width=32, heads=4, resolution=112, dropout=0.0), llm,
                                distill=DistillConfig(layer_stride=4, heads=4), teacher_width=16).eval()
    folder = write_release_folder(source, str(tmp_path / "release"), tokenizer)
    _stab_only_meta(folder, source)
    model, report = load_release(folder)
    assert model.distill_head.layers == picked and not report.missing and not report.unexpected
    for a, b in zip(model.distill_head.state_dict().values(), source.distill_head.state_dict().values()):
        assert torch.equal(a, b)


def test_a_head_that_stride_four_cannot_explain_is_an_error_naming_both_numbers(tokenizer, tmp_path):
    from panda.models.distill import DistillConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    llm = build_llm(tokenizer, hidden_size=32, layers=4, heads=4, intermediate_size=64)
    source = VideoLanguageModel(STABConfig(width=32, heads=4, resolution=112, dropout=0.0), llm,
                                distill=DistillConfig(layer_stride=2, heads=4), teacher_width=16)  # 3 layers: 4, 2, 0
    folder = write_release_folder(source, str(tmp_path / "release"), tokenizer)
    _stab_only_meta(folder, source)
    with pytest.raises(CheckpointKeyError, match=r"3 layer norms .* stride 4 on this 4-layer LLM picks 2 layers \[4, 0\]"):
        load_release(folder)


@pytest.mark.parametrize("teacher_key", ["model.video_teacher.vision_model.encoder.layers.0.mlp.fc1.weight",
                                         "model.video_tower_compressor.teacher_layer.vision_model.encoder.layers.0.mlp.fc1.weight"])
def test_the_teacher_under_either_of_its_release_names_is_skipped_and_reported(source_model, tokenizer, tmp_path,
                                                                                 teacher_key):
    folder = write_release_folder(source_model, str(tmp_path / "release"), tokenizer, extra={teacher_key: torch.randn(8, 8)})
    with open(os.path.join(folder, "panda.json"), "w") as f:
        json.dump(model_meta(source_model, frames=4), f)
    model, report = load_release(folder)
    assert report.unused == [teacher_key] and not report.unexpected and not report.missing
    for a, b in zip(model.distill_head.state_dict().values(), source_model.distill_head.state_dict().values()):
        assert torch.equal(a, b)


def test_eve_init_skips_the_teacher_inside_its_head(source_model, tokenizer, tmp_path):
    folder = write_release_folder(source_model, str(tmp_path / "eve"), tokenizer, flavour="eve", model_type="eve",
                                  extra={"model.vision_tower_compressor.teacher_layer.vision_model.post_layernorm.weight":
                                         torch.ones(8)})
    report = apply_eve_state(tiny_video_lm(tokenizer, teacher_width=16, seed=11), read_weights(folder))
    assert report.unused == ["model.video_tower_compressor.teacher_layer.vision_model.post_layernorm.weight"]


def test_release_llm_is_plain_llama_even_when_the_official_wrapper_is_registered(source_model, tokenizer, tmp_path):
    """With the official package imported beside panda, ``videopanda_llama`` resolves to its wrapper;
    panda must still build the plain LLaMA inside the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    class OfficialConfig(LlamaConfig):
        model_type = "videopanda_llama"

    class OfficialWrapper(LlamaForCausalLM):
        config_class = OfficialConfig

    folder = write_release_folder(source_model, str(tmp_path / "release"), tokenizer)
    with open(os.path.join(folder, "panda.json"), "w") as f:
        json.dump(model_meta(source_model, frames=4), f)
    AutoConfig.register("videopanda_llama", OfficialConfig)
    AutoModelForCausalLM.register(OfficialConfig, OfficialWrapper)
    try:
        assert type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))) is OfficialWrapper
        model, report = load_release(folder)
    finally:
        CONFIG_MAPPING._extra_content.pop("videopanda_llama", None)
        MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(OfficialConfig, None)
    assert type(model.llm) is LlamaForCausalLM and not report.missing
    want_visual, want_logits = _outputs(source_model, tokenizer)
    assert torch.equal(_outputs(model, tokenizer)[1], want_logits)
