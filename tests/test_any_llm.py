"""Another LLM behind STAB: chat formats from each family's own tokenizer (golden renders and label
masks), answers that stop at the family's turn-end token, training / evaluation / chat on a
checkpoint, FSDP units from ``_no_split_modules``, and LoRA adapters (what trains, resume, merge,
peft's own adapter format). Models and tokenizers are built here (tests/llm_families.py)."""

import json
import os

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides
from llm_families import FAMILIES, family_llm_folder

from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from panda.data.conversation import (NoChatFormat, get_template, stop_token_ids, tokenize_chat_prompt, tokenize_conversation,
                                     tokenize_prompt)
from panda.data.tokenizer import load_tokenizer

PRESET = {"qwen2": "qwen2_5", "llama3": "llama3", "mistral": "mistral"}
TURNS = [("<video>\nWhat colour is the moving object?", "The object is red."), ("Which way does it move?", "To the left.")]

# the rendered conversation with 2 frames, written out by hand from each family's format
GOLDEN = {
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<image><image>\nWhat colour is the moving object?<|im_end|>\n"
              "<|im_start|>assistant\nThe object is red.<|im_end|>\n"
              "<|im_start|>user\nWhich way does it move?<|im_end|>\n"
              "<|im_start|>assistant\nTo the left.<|im_end|>\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image><image>\nWhat colour is the moving object?"
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nThe object is red.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhich way does it move?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nTo the left.<|eot_id|>"),
    "mistral": ("<s>[INST] <image><image>\nWhat colour is the moving object? [/INST]The object is red.</s>"
                "[INST] Which way does it move? [/INST]To the left.</s>"),
}
FIRST_TOKEN = {"qwen2": "<|im_start|>", "llama3": "<|begin_of_text|>", "mistral": "<s>"}  # BOS once, or none


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {family: family_llm_folder(family, str(root / family)) for family in FAMILIES}


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The supervised tokens, as contiguous runs."""
    runs, current = [], []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            assert label == ids[i]
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_renders_its_golden_text_and_supervises_answers_through_the_turn_end(family_folders, family):
    tok = load_tokenizer(family_folders[family])
    fmt = get_template("chat", "spans", tok)
    turn_end = FAMILIES[family]["turn_end"]
    assert fmt.turn_end == turn_end
    text, spans = fmt.render([(q.replace("<video>", "<image><image>"), a) for q, a in TURNS])
    assert text == GOLDEN[family]
    assert [text[a:b] for a, b in spans] == [f"The object is red.{turn_end}", f"To the left.{turn_end}"]

    out = tokenize_conversation(tok, fmt, TURNS, frames=2, max_length=4096)
    ids, labels = out.input_ids.tolist(), out.labels.tolist()
    assert tok.convert_ids_to_tokens(ids[0]) == FIRST_TOKEN[family] and ids.count(IMAGE_PLACEHOLDER_ID) == 2
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) == 1  # the template's own BOS, not a second one from the tokenizer
    # the frames come first in the first user message, before its text
    first_user = ids.index(IMAGE_PLACEHOLDER_ID)
    assert "What" in tok.decode(ids[first_user + 2:first_user + 6])
    runs = _runs(ids, labels)
    end_id = tok.convert_tokens_to_ids(turn_end)
    assert [r[-1] for r in runs] == [end_id, end_id]
    assert [tok.decode(r[:-1]).strip() for r in runs] == ["The object is red.", "To the left."]
    # the generation prompt is the training text up to the answer: the model is asked as it was taught
    prompt = tokenize_prompt(tok, fmt, "What colour is the moving object?", 2).tolist()
    assert prompt == ids[:len(prompt)] and labels[len(prompt)] == ids[len(prompt)] and labels[len(prompt) - 1] == IGNORE_INDEX
    # a follow-up question (panda demo's chat): the conversation so far, cut where the second answer starts
    follow_up = tokenize_chat_prompt(tok, fmt, TURNS[:1], TURNS[1][0], 2).tolist()
    assert follow_up == ids[:len(follow_up)] and labels[len(follow_up) - 1] == IGNORE_INDEX
    assert tok.decode(_runs(ids[len(follow_up):], labels[len(follow_up):])[0][:-1]).strip() == "To the left."
    assert end_id in [stop_token_ids(fmt, tok)] + list(fmt.stop_token_ids(tok))


def test_a_tokenizer_without_chat_template_or_known_format_is_refused_clearly(tokenizer, family_folders):
    with pytest.raises(NoChatFormat, match="has no chat_template .* model.template=vicuna_v1"):
        get_template("chat", "spans", tokenizer)  # the synthetic tokenizer: Vicuna format only
    with pytest.raises(ValueError, match="unknown conversation template 'chatml'"):
        get_template("chatml")
    from panda.config import to_train_config, validate

    with pytest.raises(ValueError, match="model.tokenization=spans"):  # to_train_config validates
        to_train_config(compose(["model.template=chat", "model.eval_template=chat"]))
    cfg = to_train_config(compose([f"llm={PRESET['qwen2']}", f"llm.pretrained={family_folders['qwen2']}"]))
    assert (cfg.model.template, cfg.model.eval_template, str(cfg.model.tokenization)) == ("chat", "chat", "spans")
    validate(cfg)


def _tiny_model(folder, seed=0):
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.manual_seed(seed)
    llm = build_llm(0, pretrained=folder)
    return VideoLanguageModel(STABConfig(width=32, heads=4, resolution=56, dropout=0.0, chunk_size=2), llm)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_answers_stop_at_the_familys_turn_end_token(family_folders, family, make_video):
    from panda.data.datasets import FramePipeline

    tok = load_tokenizer(family_folders[family])
    fmt = get_template("chat", "spans", tok)
    model = _tiny_model(family_folders[family]).train()
    frames = FramePipeline(2, 56, 14)(make_video(frames=4))
    pixels, mask = frames["pixels"][None], frames["frame_mask"][None]
    turns = [("<video>\nWhat colour is the moving object?", "The object is red.")]
    sample = tokenize_conversation(tok, fmt, turns, frames=2, max_length=4096)
    ids, labels = sample.input_ids[None], sample.labels[None]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(ids, torch.ones_like(ids), pixels, mask, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    prompt = tokenize_prompt(tok, fmt, "What colour is the moving object?", 2)[None]
    out = model.generate(prompt, torch.ones_like(prompt), pixels, mask, max_new_tokens=40,
                         eos_token_id=stop_token_ids(fmt, tok, model.llm), pad_token_id=tok.pad_token_id)[0].tolist()
    end_id = tok.convert_tokens_to_ids(FAMILIES[family]["turn_end"])
    answer = [t for t in sample.labels.tolist() if t != IGNORE_INDEX]
    assert out[:len(answer)] == answer and answer[-1] == end_id  # stopped at the turn end, not at max_new_tokens
    assert tok.decode(out, skip_special_tokens=True).strip() == "The object is red."


def test_qwen_trains_evaluates_and_chats_from_its_checkpoint(synthetic_root, family_folders, tmp_path):
    from panda.chat import main as chat_main
    from panda.evaluation.run import evaluate
    from panda.training.run import train

    folder = family_folders["qwen2"]
    summary = train(compose(tiny_overrides(synthetic_root, str(tmp_path / "run")) + [
        f"llm={PRESET['qwen2']}", f"llm.pretrained={folder}", "llm.dtype=float32", "trainer.max_steps=30",
        "logger.val_every_n_steps=0", "evaluate=false"]))
    assert summary["train/loss_final"] < summary["train/loss_first"] - 0.3
    ckpt = summary["checkpoint"]
    results = evaluate(compose([f"checkpoint={ckpt}", f"run_dir={tmp_path / 'eval'}", "num_workers=0", "max_new_tokens=6",
                                "benchmark=[synthetic]"], config_name="evaluate"))
    synthetic = results["benchmarks"]["synthetic"]
    assert synthetic["generated_now"] == synthetic["num_questions"] > 0 and results["decoding"]["template"] == "chat"
    rows = [json.loads(line) for line in (tmp_path / "eval" / "synthetic" / "predictions.jsonl").read_text().splitlines()]
    assert all("<|im_end|>" not in r["prediction"] and "<|im_start|>" not in r["prediction"] for r in rows)
    videos = os.path.join(synthetic_root, "eval", "Synthetic_Zero_Shot_QA", "videos")
    video = os.path.join(videos, sorted(os.listdir(videos))[0])
    assert chat_main(["--checkpoint", ckpt, "--video", video, "--max-new-tokens", "4", "--no-stream", "What colour?"]) == 0


def test_decoder_layers_come_from_no_split_modules(family_folders):
    from transformers import GPT2Config, GPT2LMHeadModel

    from panda.models.llm_parts import decoder_layers, llm_width

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=50))
    assert decoder_layers(gpt2) is gpt2.transformer.h and llm_width(gpt2) == 32
    for family, cls in [("qwen2", "Qwen2DecoderLayer"), ("mistral", "MistralDecoderLayer")]:
        llm = _tiny_model(family_folders[family]).llm
        layers = decoder_layers(llm)
        assert layers is llm.model.layers and {type(m).__name__ for m in layers} == {cls}


# --------------------------------------------------------------------------- LoRA

LORA = ["llm.adapter=lora", "llm.lora.rank=4", "llm.lora.alpha=8", "llm.lora.dropout=0.0", "evaluate=false",
        "logger.val_every_n_steps=0", "stage.schedule=constant", "stage.warmup_ratio=0"]


def _train(root, run_dir, *extra):
    from panda.training.run import train

    return train(compose(tiny_overrides(root, str(run_dir)) + LORA + list(extra)))


def test_lora_trains_only_adapters_and_the_vision_side_and_resumes_exactly(synthetic_root, tmp_path):
    straight = _train(synthetic_root, tmp_path / "straight", "trainer.max_steps=4")
    _train(synthetic_root, tmp_path / "split", "trainer.max_steps=2")
    resumed = _train(synthetic_root, tmp_path / "split", "trainer.max_steps=4", "resume=last")
    a = torch.load(straight["checkpoint"], map_location="cpu", weights_only=False)
    b = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=False)
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # resume is exact, adapters included
    adapters = [k for k in sa if ".lora_" in k]
    assert adapters and all(k.startswith("model.llm.") for k in adapters)
    assert any(".lora_B." in k and sa[k].abs().sum() > 0 for k in adapters)  # B starts at zero: it trained
    # the optimiser holds state for exactly the adapters, STAB, projector (no LLM weight)
    from panda.build import build_model, build_tokenizer
    from panda.config import to_train_config

    import lightning as L

    cfg = to_train_config(compose(tiny_overrides(synthetic_root) + LORA))
    L.seed_everything(cfg.seed)  # as train() does before building
    model = build_model(cfg, build_tokenizer(cfg))
    from panda.training.module import apply_stage

    counts = apply_stage(model, cfg.stage)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or not n.startswith("llm.") for n in trainable)
    assert counts["llm"] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert len(a["optimizer_states"][0]["state"]) == len(trainable)
    # the LLM's own weights did not move: equal in the 4-step checkpoint and a fresh build of the run
    fresh = model.state_dict()
    base = [k for k in fresh if k.startswith("llm.") and ".lora_" not in k]
    assert base and all(torch.equal(sa["model." + k], fresh[k]) for k in base)


def test_lora_export_merges_into_the_llm_or_writes_peft_adapter(synthetic_root, tmp_path):
    from peft import PeftModel

    from panda.export import main as export_main
    from panda.loading import load_model

    ckpt = _train(synthetic_root, tmp_path / "run", "trainer.max_steps=3", "stage.lr=0.01")["checkpoint"]
    adapted = load_model(ckpt).model
    merged_dir, adapter_dir = str(tmp_path / "merged"), str(tmp_path / "adapter")
    assert export_main([ckpt, "--out", merged_dir]) == 0 and export_main([ckpt, "--out", adapter_dir, "--adapter-only"]) == 0
    merged = load_model(merged_dir).model
    assert not any(".lora_" in k for k in merged.state_dict())
    torch.manual_seed(0)
    pixels, mask = torch.randn(2, 4, 3, 112, 112), torch.ones(2, 4, 112, 112)
    ids = torch.tensor([[5, 6] + [IMAGE_PLACEHOLDER_ID] * 4 + [7, 8, 9]] * 2)
    with torch.no_grad():
        want = adapted(ids, torch.ones_like(ids), pixels, mask).logits
        got = merged(ids, torch.ones_like(ids), pixels, mask).logits
    assert (want - got).abs().max() < 1e-5 and want.abs().max() > 0
    # the adapter alone loads with peft's own loader onto the LLM's own weights
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    from transformers import AutoModelForCausalLM

    state = {k.replace(".base_layer", ""): v for k, v in adapted.llm.state_dict().items() if ".lora_" not in k}
    base = AutoModelForCausalLM.from_config(adapted.llm.config)
    base.load_state_dict(state)
    x = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        without = base.eval()(input_ids=x).logits
        peft_llm = PeftModel.from_pretrained(base, adapter_dir).eval()  # injects into base in place
        with_adapter = peft_llm(input_ids=x).logits
        assert (with_adapter - adapted.llm.eval()(input_ids=x).logits).abs().max() < 1e-6
        assert (with_adapter - without).abs().max() > 1e-4  # the adapter matters


def test_qlora_on_cpu_stops_at_config_time_with_a_one_line_reason(synthetic_root, tmp_path):
    from panda.config import LoRAConfig, to_train_config
    from panda.models.adapters import AdapterUnavailable

    with pytest.raises(AdapterUnavailable, match="needs a CUDA GPU.*llm.adapter=lora"):
        to_train_config(compose(tiny_overrides(synthetic_root) + ["llm.adapter=qlora"]))
    proc = run_cli(["train.py", *tiny_overrides(synthetic_root), "llm.adapter=qlora", f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2 and "llm.adapter=qlora" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="matches no linear layer.*q_proj"):
        from panda.models.adapters import add_lora
        from panda.models.video_lm import build_llm

        add_lora(build_llm(64, hidden_size=32, layers=1, heads=4), LoRAConfig(target_modules=["c_attn"]))


@pytest.mark.slow
def test_fsdp_shards_qwen_decoder_layers_with_lora_over_two_processes(synthetic_root, family_folders, tmp_path):
    run_dir = tmp_path / "fsdp"
    overrides = [o for o in tiny_overrides(synthetic_root) if not o.startswith("logger=")]
    run_cli(["train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=none",
             f"llm={PRESET['qwen2']}", f"llm.pretrained={family_folders['qwen2']}", "llm.dtype=float32",
             "trainer.fsdp.param_dtype=null", "trainer.max_steps=3", f"hydra.run.dir={run_dir}", *overrides, *LORA])
    reports = [json.loads((run_dir / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]
    for r in reports:
        assert r["decoder_unit_classes"] == ["Qwen2DecoderLayer"]
        assert r["frozen_with_grad"] == 0 and r["frozen_in_optimizer"] == 0
        before, after = r["digests_before"], r["digests_after"]
        assert after["llm"] == before["llm"] and after["llm_adapter"] != before["llm_adapter"]
        assert after["stab"] != before["stab"]
    assert reports[0]["digests_after"] == reports[1]["digests_after"]


def test_the_planner_counts_gradients_and_adamw_states_for_the_adapters_only(synthetic_root):
    import lightning as L

    from panda.build import build_model, build_tokenizer
    from panda.config import to_train_config
    from panda.plan import GIB, plan
    from panda.training.module import apply_stage

    full_cfg = to_train_config(compose(tiny_overrides(synthetic_root)))
    lora_cfg = to_train_config(compose(tiny_overrides(synthetic_root) + LORA))
    full, lora = plan(full_cfg, gpu="cpu"), plan(lora_cfg, gpu="cpu")
    L.seed_everything(0)
    model = build_model(lora_cfg, build_tokenizer(lora_cfg))
    apply_stage(model, lora_cfg.stage)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora.memory_gib["AdamW states"] * GIB == pytest.approx(2 * 4 * trainable)
    assert lora.memory_gib["gradients"] * GIB == pytest.approx(4 * trainable)
    assert lora.memory_gib["parameters"] * GIB == pytest.approx(4 * sum(p.numel() for p in model.parameters()))
    assert lora.memory_gib["gradients"] < full.memory_gib["gradients"]
    assert any("adapter parameters train" in n for n in lora.notes)
    assert lora.flops_per_sample["LLM backward (input gradients + adapters)"] == full.flops_per_sample["LLM backward"] / 2
