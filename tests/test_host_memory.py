"""Initial weights under FSDP: rank 0 reads them and sends each rank its shards; the other ranks
build the model on the meta device and never open the weight files (panda/training/fsdp.py)."""

import json
import os
import shutil

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides, tiny_video_lm, write_release_folder

from panda.build import build_model, build_tokenizer
from panda.config import to_train_config
from panda.models.checkpoints import read_weights
from panda.training.fsdp import non_persistent_buffers
from panda.training.module import apply_stage

LORA = ["llm.adapter=lora", "llm.lora.rank=4"]


def _hf_llama_folder(folder, tokenizer, vocab, tied=False):
    """A plain Hugging Face LLaMA folder (safetensors) with ``vocab`` embedding rows and the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _signature(model):
    """What must agree between the model rank 0 builds and the meta-device one: every parameter and
    buffer (name, shape, dtype, trainable), the non-persistent buffers, the LLM's config."""
    params = {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: (tuple(b.shape), b.dtype) for n, b in model.named_buffers()}
    tied = model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    return params, buffers, [n for n, _ in non_persistent_buffers(model)], tied, model.llm.config.to_dict()


@pytest.mark.parametrize("init", ["built", "eve", "release", "pretrained", "pretrained+tied", "eve+lora"])
def test_the_meta_device_model_has_the_structure_of_the_built_one_and_reads_nothing(init, synthetic_root, tokenizer, tmp_path,
                                                                                   monkeypatch):
    extra = ["stab.width=32"]
    if init.startswith(("eve", "release")):
        flavour = init.split("+")[0]
        folder = write_release_folder(tiny_video_lm(tokenizer, seed=5), str(tmp_path / flavour), tokenizer, flavour=flavour,
                                      model_type="eve" if flavour == "eve" else "videopanda_llama")
        extra += [f"init.kind={flavour}", f"init.path={folder}"]
    elif init == "pretrained":  # fewer rows than the tokenizer: both builds resize the embeddings
        extra += [f"llm.pretrained={_hf_llama_folder(tmp_path / 'hf', tokenizer, len(tokenizer) - 3)}"]
    elif init == "pretrained+tied":  # the LM head is the input embedding (no resize, which would tie it anyway)
        extra += [f"llm.pretrained={_hf_llama_folder(tmp_path / 'hf', tokenizer, len(tokenizer), tied=True)}"]
    extra += LORA if init.endswith("lora") else []
    cfg = to_train_config(compose(tiny_overrides(synthetic_root) + extra))
    tok = build_tokenizer(cfg)
    built = build_model(cfg, tok)
    import panda.models.checkpoints as checkpoints

    def no_reading(*args, **kwargs):
        raise AssertionError("the meta-device build read a weight file")

    monkeypatch.setattr(checkpoints, "read_file_weights", no_reading)
    monkeypatch.setattr("safetensors.torch.load_file", no_reading)
    meta = build_model(cfg, tok, meta=True)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    apply_stage(built, cfg.stage)
    apply_stage(meta, cfg.stage)
    assert _signature(meta) == _signature(built)


TWO_RANKS = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=none", "evaluate=false",
             "trainer.max_steps=2", "trainer.fsdp.param_dtype=null", "trainer.deterministic=true", "export_final=true"]


@pytest.mark.slow
def test_fsdp_from_a_folder_matches_every_rank_reading_it_and_rank_1_never_opens_the_weights(synthetic_root, tokenizer,
                                                                                           tmp_path):
    """An EVE folder (its LLM, the STAB parts it shares; the other STAB parts and LoRA adapters fresh,
    STAB and adapter dropout on): rank 0 reads and sends, against every rank reading for itself.
    Rank 1's ``init.path`` resolves (``LOCAL_RANK``) to a copy of the folder without its weight files,
    so any read of the weights on rank 1 fails the run."""
    rank0 = write_release_folder(tiny_video_lm(tokenizer, seed=5), str(tmp_path / "rank0"), tokenizer, flavour="eve",
                                 model_type="eve")
    rank1 = tmp_path / "rank1"
    shutil.copytree(rank0, rank1, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not list(rank1.glob("*.safetensors")) and (rank1 / "config.json").exists()
    overrides = [o for o in tiny_overrides(synthetic_root) if not o.startswith("logger=")]
    common = [*TWO_RANKS, *overrides, *LORA, "stab.width=32", "stab.dropout=0.1", "init.kind=eve"]
    per_rank = "init.path='" + str(tmp_path) + "/rank${oc.env:LOCAL_RANK,0}'"
    run_cli(["train.py", *common, per_rank, f"hydra.run.dir={tmp_path / 'broadcast'}"])
    run_cli(["train.py", *common, f"init.path={rank0}", "trainer.fsdp.broadcast_from_rank0=false",
             f"hydra.run.dir={tmp_path / 'every_rank'}"])
    # the check bites: when every rank reads, rank 1 reads its own init.path and finds no weights there
    proc = run_cli(["train.py", *common, per_rank, "trainer.fsdp.broadcast_from_rank0=false",
                    f"hydra.run.dir={tmp_path / 'rank1_reads'}"], check=False)
    assert proc.returncode != 0 and f"{rank1}: model.safetensors.index.json names shards that are not there" in proc.stderr

    def results(name):
        run = tmp_path / name
        summary = json.loads((run / "summary.json").read_text())
        audits = [json.loads((run / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]
        return summary["train/loss_by_step"], [(a["digests_before"], a["digests_after"]) for a in audits], run / "final"

    losses, digests, final = results("broadcast")
    old_losses, old_digests, old_final = results("every_rank")
    assert [s for s, _ in losses] == [1, 2] and losses == old_losses
    assert digests == old_digests and digests[0] == digests[1]
    a, b = read_weights(str(final)), read_weights(str(old_final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the exports: the same weights
