"""``panda export --format hf``: a folder plain ``transformers`` loads with ``trust_remote_code=True`` in a
process where ``import panda`` fails, whose ``generate(**processor(video=..., text=...))`` answers token
for token as ``panda chat`` does, for a Vicuna-format model (SentencePiece tokenizer, the release's
tokenisation) and a chat-template one (the tiny Qwen2 stand-in, tied embeddings), both trained with
LoRA and exported with it merged."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_video_file, tiny_overrides
from llm_families import family_llm_folder

QUESTION = "What colour is the moving object?"
NEW_TOKENS = 12
LORA = ["llm.adapter=lora", "llm.lora.rank=4", "llm.lora.alpha=8", "llm.lora.dropout=0.0", "evaluate=false",
        "logger.val_every_n_steps=0", "trainer.max_steps=3"]

# run in a fresh interpreter that cannot import panda: only transformers and the folder's own code
NO_PANDA = r"""
import json, sys
sys.modules["panda"] = None  # any import of panda, by the folder's code or by transformers, now fails
from transformers import AutoModelForCausalLM, AutoProcessor
folder, video, question, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(video=video, text=question, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=new_tokens)
print(json.dumps({"ids": out[0].tolist(), "text": processor.batch_decode(out, skip_special_tokens=True)[0],
                  "model_module": type(model).__module__, "processor_module": type(processor).__module__,
                  "panda_modules": sorted(m for m in sys.modules if m == "panda" or m.startswith("panda."))}))
"""


def panda_answer_ids(ckpt: str, video: str) -> list[int]:
    """What panda chat generates for the checkpoint (its prompt, frames, stop tokens, greedy), as ids."""
    from panda.data.conversation import stop_token_ids, tokenize_prompt
    from panda.data.datasets import FramePipeline
    from panda.loading import load_model

    loaded = load_model(ckpt)
    model, tok, stab = loaded.model, loaded.tokenizer, loaded.model.stab_cfg
    sample = FramePipeline(loaded.frames, stab.resolution, stab.patch_size, stab.ratio, 1.0)(video)
    ids = tokenize_prompt(tok, loaded.prompt_template, QUESTION, loaded.frames)[None]
    out = model.generate(ids, torch.ones_like(ids), sample["pixels"][None], sample["frame_mask"][None],
                         max_new_tokens=NEW_TOKENS, eos_token_id=stop_token_ids(loaded.prompt_template, tok, model.llm),
                         pad_token_id=tok.pad_token_id)
    return out[0].tolist()


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    return family_llm_folder("qwen2", str(tmp_path_factory.mktemp("llms") / "qwen2"))


@pytest.mark.parametrize("kind", ["vicuna", "chat_template"])
def test_hf_export_loads_without_panda_and_answers_as_panda_chat(kind, synthetic_root, qwen2_folder, tmp_path, capsys):
    from panda.chat import main as chat_main
    from panda.export import main as export_main
    from panda.training.run import train

    llm = [f"llm.tokenizer={os.path.join(REPO, 'tests', 'golden', 'release_tokenizer')}"] if kind == "vicuna" else \
        ["llm=qwen2_5", f"llm.pretrained={qwen2_folder}", "llm.dtype=float32"]
    summary = train(__import__("conftest").compose(tiny_overrides(synthetic_root, str(tmp_path / "run")) + LORA + llm))
    ckpt, out, video = summary["checkpoint"], str(tmp_path / "hf"), str(tmp_path / "clip.mp4")
    make_video_file(video, frames=12)
    assert export_main([ckpt, "--out", out, "--format", "hf"]) == 0

    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "configuration_panda.py", "modeling_panda.py", "processing_panda.py", "panda_models_stab.py"} <= files
    if kind == "vicuna":
        assert "tokenizer.model" in files  # the release tokenisation reads the SentencePiece model
    from panda.model_card import read_front_matter

    card = read_front_matter(open(os.path.join(out, "README.md"), encoding="utf-8").read())
    assert card["library_name"] == "transformers" and card["pipeline_tag"] == "video-text-to-text" and "lora" in card["tags"]
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_panda.PandaVideoForCausalLM"
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k or "distill_head" in k for k in keys) and any(k.startswith("model.stab.") for k in keys)

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_PANDA, out, video, QUESTION, str(NEW_TOKENS)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MISSING" not in proc.stderr and "UNEXPECTED" not in proc.stderr, proc.stderr[-3000:]  # every weight loaded
    hf = json.loads(proc.stdout.strip().splitlines()[-1])
    assert hf["panda_modules"] == ["panda"] and hf["model_module"].startswith("transformers_modules.")
    assert hf["processor_module"].startswith("transformers_modules.")

    ids = panda_answer_ids(ckpt, video)
    assert hf["ids"] == ids and len(ids) > 1  # token for token (the LoRA run's adapters, merged in the folder)
    capsys.readouterr()
    assert chat_main(["--checkpoint", ckpt, "--video", video, "--max-new-tokens", str(NEW_TOKENS), "--no-stream",
                      QUESTION]) == 0
    assert capsys.readouterr().out.strip() == hf["text"]
    # panda itself loads the folder too (chat, evaluate, demo): the same answer
    assert chat_main(["--checkpoint", out, "--video", video, "--max-new-tokens", str(NEW_TOKENS), "--no-stream",
                      QUESTION]) == 0
    assert capsys.readouterr().out.strip() == hf["text"]


def test_the_folder_code_is_the_installed_panda_with_only_its_imports_rewritten(tmp_path):
    """Each file is panda's module, line for line, but for its header and its panda import lines."""
    import importlib.util

    from panda.hub.bundle import flat_name, module_closure, write_code

    written = write_code(str(tmp_path))
    modules = module_closure()
    assert sorted(written) == sorted(f"{flat_name(m)}.py" for m in modules)
    assert {"panda.models.stab", "panda.models.video_lm", "panda.data.conversation", "panda.data.frames"} <= set(modules)
    for module in modules:
        original = open(importlib.util.find_spec(module).origin, encoding="utf-8").read().splitlines()
        copied = open(tmp_path / f"{flat_name(module)}.py", encoding="utf-8").read().splitlines()
        assert copied[0].startswith("# Generated by panda") and len(copied) == len(original) + 1
        changed = [(a, b) for a, b in zip(original, copied[1:]) if a != b]
        assert all("from panda." in a and "from .panda_" in b or "from .configuration_panda" in b for a, b in changed), changed


def test_a_plugin_part_is_refused_with_the_release_format_named(tokenizer, tmp_path):
    from conftest import tiny_video_lm
    from panda.hub.bundle import BundleError
    from panda.hub.export import export_hf
    from panda.models.stab import PROJECTORS

    @PROJECTORS.register("hub_test_linear")
    def hub_test_linear(in_dim, out_dim):
        return torch.nn.Linear(in_dim, out_dim)

    model = tiny_video_lm(tokenizer)
    model.projector_kind = "hub_test_linear"
    with pytest.raises(BundleError, match="model.projector=hub_test_linear comes from the plugin module .*--format release"):
        export_hf(model, tokenizer, str(tmp_path / "hf"), 4, "vicuna_v1_eval", "release")
    assert not (tmp_path / "hf").exists()
