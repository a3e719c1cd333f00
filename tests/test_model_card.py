"""The model card ``panda export`` writes into an exported folder (panda/model_card.py): valid Hub
front matter, and a body that states what the run's config, its checkpoint and its run folder say."""

import json
import os
import re
import subprocess

import pytest
import yaml
from conftest import REPO, compose, train_tiny

from panda import model_card
from panda.export import main as export_main


def _card(folder) -> tuple[dict, str]:
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _row(body: str, key: str) -> str:
    """The value cell of the table row whose first cell is ``key``."""
    match = re.search(rf"^\| {re.escape(key)} \| (.*?) \|", body, re.M)
    assert match, f"no row {key!r}"
    return match.group(1)


def _head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def loaded_tiny(tiny_checkpoint):
    from panda.loading import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


def test_a_release_export_has_a_card_that_states_the_run(tiny_checkpoint, tmp_path):
    out = str(tmp_path / "tiny-export")
    assert export_main([tiny_checkpoint, "--out", out]) == 0
    meta, body = _card(out)
    from panda.loading import load_checkpoint

    cfg = load_checkpoint(tiny_checkpoint).run_config
    assert meta["license"] == "other" and meta["library_name"] == "panda"
    assert meta["pipeline_tag"] == "video-text-to-text"
    assert "base_model" not in meta  # the tiny LLM was built from sizes
    assert {"video", "video-language", "stab", "panda", f"stage-{cfg.stage.name}", "llama"} <= set(meta["tags"])
    assert "lora" not in meta["tags"]
    # the model as the run's config built it
    assert _row(body, "`stab.width`") == str(cfg.stab.width) == "32"
    assert _row(body, "`stab.resolution`") == str(cfg.stab.resolution)
    assert _row(body, "`stab.lsd`") == cfg.stab.lsd and _row(body, "`stab.use_fsra`") == "yes"
    import dataclasses

    rows = {f.name: re.search(rf"^\| `stab\.{f.name}` \| [^|]* \| (.*) \|$", body, re.M) for f in dataclasses.fields(cfg.stab)}
    assert all(m and m.group(1).strip() for m in rows.values()), "every stab key has a row that says what it is"
    assert _row(body, "LLM width") == str(cfg.llm.hidden_size) and _row(body, "LLM layers") == str(cfg.llm.layers)
    assert _row(body, "LLM").startswith("`LlamaForCausalLM`") and "built from sizes" in _row(body, "LLM")
    assert _row(body, "LoRA") == "none"
    assert f"Frames per video: {cfg.frames}, `release` sampling." in body
    assert f"Visual tokens per frame: {cfg.stab.max_tokens_per_frame()} for a square frame" in body
    # the stage and its data, from the run's config and the checkpoint
    assert _row(body, "stage").startswith(f"`{cfg.stage.name}`")
    assert _row(body, "steps").startswith("2 optimiser steps") and cfg.data.root in _row(body, "data")
    assert "None recorded: the run skipped it (evaluate=false)." in body
    assert "### Benchmarks (`evaluate.py`)\n\nNone recorded" in body
    # how to load: the panda way, and how to get a Hugging Face-native folder
    assert 'panda chat --checkpoint FOLDER --video clip.mp4 "What is happening?"' in body
    assert f"panda export {tiny_checkpoint} --out DIR --format hf" in body
    # provenance: this checkout's commit, the installed version
    assert f"`{_head_commit()}`" in _row(body, "exported from commit")
    assert _row(body, "panda version") == model_card.panda_version()
    from huggingface_hub import ModelCard  # the Hub's own parser reads the same metadata

    assert ModelCard.load(os.path.join(out, "README.md")).data.to_dict()["pipeline_tag"] == "video-text-to-text"


def test_a_merged_lora_run_says_so_with_its_results_and_earlier_stage(synthetic_root, tiny_checkpoint, tmp_path):
    from panda.evaluation.run import evaluate

    run = tmp_path / "lora_run"
    summary = train_tiny(synthetic_root, run, "trainer.max_steps=2", "stage=finetune", "llm.adapter=lora", "llm.lora.rank=4",
                         "llm.lora.alpha=8", "logger.val_every_n_steps=0", "init.kind=checkpoint",
                         f"init.path={tiny_checkpoint}")
    ckpt = summary["checkpoint"]
    evaluate(compose([f"checkpoint={ckpt}", f"run_dir={run / 'evaluate'}", "num_workers=0", "benchmark=[synthetic]",
                      "benchmark.synthetic.limit=4", "max_new_tokens=4"], config_name="evaluate"))
    out = str(tmp_path / "merged")
    assert export_main([ckpt, "--out", out, "--license", "apache-2.0"]) == 0
    meta, body = _card(out)
    assert meta["license"] == "apache-2.0" and {"lora", "merged-lora", "stage-finetune"} <= set(meta["tags"])
    assert "adapters (rank 4, alpha 8, on q_proj" in _row(body, "LoRA") and "merged into the LLM's weights" in _row(body, "LoRA")
    # the earlier stage its init.path names, then this one
    assert "### Stage 1: `scratch`" in body and "### Stage 2: `finetune` (this checkpoint)" in body
    stage1, stage2 = body.split("### Stage 1: `scratch`")[1].split("### Stage 2: `finetune` (this checkpoint)")
    assert _row(stage1, "steps").startswith("2 optimiser steps") and _row(stage1, "started from") == "random initialisation"
    assert "through lora adapters, rank 4" in _row(stage2, "stage") and tiny_checkpoint in _row(stage2, "started from")
    # the held-out result of summary.json, with intervals recomputed from the run's verdicts
    held = body.split("### Held-out split at the end of training")[1].split("###")[0]
    assert f"{summary['eval/judged']} of {summary['eval/num_questions']} questions judged" in held
    accuracy = re.search(r"^\| accuracy \| ([\d.]+) \| \[([\d.]+), ([\d.]+)\] \|", held, re.M)
    assert accuracy and float(accuracy.group(1)) == pytest.approx(summary["eval/accuracy"], abs=5e-4)
    assert float(accuracy.group(2)) <= float(accuracy.group(1)) <= float(accuracy.group(3))
    # evaluate.py's results.json of this checkpoint: its judge and its intervals
    results = json.load(open(run / "evaluate" / "results.json"))
    bench = body.split("### Benchmarks (`evaluate.py`)")[1].split("## How to load")[0]
    assert "From `evaluate/results.json`" in bench and "Judge: `exact_match`" in bench and "fingerprint none" in bench
    ci = results["benchmarks"]["synthetic"]["accuracy_ci95"]
    assert f"| accuracy | {results['benchmarks']['synthetic']['accuracy']:.3f} | [{ci[0]:.3f}, {ci[1]:.3f}] |" in bench
    assert _row(body, "trained at commit") == f"`{summary['git_commit']}`"
    assert _row(body, "license") == "`apache-2.0`"


def test_hf_format_base_model_and_license_of_a_base_llm_folder(loaded_tiny, tiny_checkpoint, tmp_path):
    """A run whose LLM came from a Hub cache snapshot: base_model is its Hub id, the license its README's."""
    import dataclasses

    snapshot = tmp_path / "hub" / "models--lmsys--vicuna-7b-v1.5" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama2\n---\n# Vicuna\n")
    cfg = loaded_tiny.run_config
    loaded = dataclasses.replace(loaded_tiny, run_config=dataclasses.replace(
        cfg, llm=dataclasses.replace(cfg.llm, pretrained=str(snapshot))))
    text = model_card.render_model_card(loaded, tiny_checkpoint, str(tmp_path / "hf"), "hf")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["base_model"] == "lmsys/vicuna-7b-v1.5"
    assert meta["license"] == "llama2"
    assert 'AutoModelForCausalLM.from_pretrained("FOLDER", trust_remote_code=True)' in text
    assert "--format hf" not in text  # it is the hf folder already
    assert model_card.hub_id_of("/models/vicuna-7b-v1.5") == "vicuna-7b-v1.5"
    with pytest.raises(ValueError, match="format"):
        model_card.render_model_card(loaded, tiny_checkpoint, str(tmp_path / "x"), "gguf")


def test_the_earlier_stage_of_a_release_init_is_its_run_folder(tiny_checkpoint, tmp_path):
    """init.path=RUN/final (how the recipe's stages chain) leads to RUN/checkpoints/last.ckpt."""
    from panda.config import InitConfig, TrainConfig

    stage1 = tmp_path / "stage1"
    (stage1 / "checkpoints").mkdir(parents=True)
    (stage1 / "final").mkdir()
    os.symlink(tiny_checkpoint, stage1 / "checkpoints" / "last.ckpt")
    cfg = TrainConfig(init=InitConfig(kind="release", path=str(stage1 / "final")))
    chain = model_card.earlier_stages(cfg)
    assert len(chain) == 1 and chain[0][1].stage.name == "scratch" and chain[0][2]["global_step"] == 2


def test_no_git_means_an_unknown_commit(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    from panda import runs

    monkeypatch.setattr(runs.subprocess, "run", no_git)
    assert model_card.export_commit() == ("unknown", False)
