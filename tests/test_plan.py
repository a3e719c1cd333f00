"""python -m panda.plan: the recipe fits the paper's hardware, its FLOPs match the FLOP counter,
and its memory prediction matches a measured CPU training step."""

import json
import os
import sys

import pytest
import torch
from conftest import REPO, compose, run_cli

from panda.config import to_train_config
from panda.plan import llm_forward_flops, main, plan

GEOMETRY = ["trainer.devices=4", "trainer.num_nodes=16", "teacher.path=/m/LanguageBind_Video_merge", "data.root=/data",
            "runs_root=/runs", "init.path=/m/EVE-7B-Pretrain-v1.0"]


def recipe(stage, *extra):
    return to_train_config(compose([f"experiment=videopanda_7b/{stage}", *GEOMETRY, *extra]))


@pytest.mark.parametrize("stage", ["stage1_prealign", "stage2_pretrain", "stage3_finetune"])
def test_every_recipe_stage_fits_an_80_gb_gpu_at_its_documented_geometry(stage):
    p = plan(recipe(stage), gpu="h100_80g", llm_preset="vicuna-7b")
    assert p.world == 64 and p.fits and p.margin_gib > 8, (p.peak_gib, p.memory_gib)
    assert p.sequence == 4096 - 8 + 8 * 273  # the longest sample: every text position and all visual tokens
    assert p.step_s > 0 and p.stage_h > 0


def test_stage2_with_plain_ddp_does_not_fit_and_the_fix_is_fsdp():
    p = plan(recipe("stage2_pretrain", "trainer=gpu", "trainer.devices=4"), gpu="h100_80g", llm_preset="vicuna-7b")
    assert p.strategy == "ddp" and not p.fits and p.peak_gib > 100
    assert p.fix.startswith("trainer=fsdp")
    # 7B x (4 B weights + 4 B gradients + 8 B AdamW) ~ 16 bytes per parameter, replicated
    assert 100 < p.memory_gib["parameters"] + p.memory_gib["gradients"] + p.memory_gib["AdamW states"] < 110


def test_the_cli_prints_a_verdict_and_json_and_fails_when_it_does_not_fit(capsys):
    args = ["experiment=videopanda_7b/stage2_pretrain", *GEOMETRY, "llm_preset=vicuna-7b", "gpu=h100_80g"]
    assert main(args) == 0
    assert "fits with" in capsys.readouterr().out
    assert main(args + ["trainer=gpu", "trainer.devices=4", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["fix"].startswith("trainer=fsdp") and out["strategy"] == "ddp"


def test_host_memory_per_node_holds_one_full_model_under_fsdp_and_one_per_rank_otherwise(capsys):
    """Planned, node 0 while the initial weights are read: under FSDP rank 0 alone holds the full
    model (fp32 in stage 2); when every rank reads (broadcast_from_rank0=false, or DDP) each of the
    node's 4 ranks does; plus the teacher on every rank and, with cpu_offload, every rank's shards."""
    import dataclasses

    from panda.plan import GIB

    fsdp = plan(recipe("stage2_pretrain"), gpu="h100_80g", llm_preset="vicuna-7b")
    every = plan(recipe("stage2_pretrain", "trainer.fsdp.broadcast_from_rank0=false"), gpu="h100_80g", llm_preset="vicuna-7b")
    ddp = plan(recipe("stage2_pretrain", "trainer=gpu", "trainer.devices=4"), gpu="h100_80g", llm_preset="vicuna-7b")
    model_bytes = 4 * sum(n for unit, n in fsdp.params.items() if unit != "teacher")  # stage 2: everything fp32
    one = fsdp.host_memory_gib["full model on the reading rank"]
    assert fsdp.host_readers == 1 and one == pytest.approx(model_bytes / GIB) and 25 < one < 27  # ~6.8B parameters
    assert every.host_readers == ddp.host_readers == 4
    assert every.host_memory_gib["full model on every rank"] == pytest.approx(4 * one)
    assert ddp.host_memory_gib["full model on every rank"] == pytest.approx(4 * one)
    teacher = fsdp.host_memory_gib["frozen teacher (every rank)"]
    assert teacher > 0 and fsdp.host_peak_gib == pytest.approx(one + teacher)
    assert every.host_peak_gib == pytest.approx(4 * one + teacher)
    # cpu_offload needs CUDA to pass the config checks; the planner takes the config as it is
    cfg = recipe("stage2_pretrain")
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, fsdp=dataclasses.replace(cfg.trainer.fsdp, cpu_offload=True)))
    offload = plan(cfg, gpu="h100_80g", llm_preset="vicuna-7b")
    shards = offload.host_memory_gib["offloaded shards: parameters, gradients, AdamW (every rank)"]
    assert shards == pytest.approx(4 * model_bytes / 64 * 4 / GIB)  # (weights + gradients + 2 moments) / 64 ranks, x 4 ranks
    assert offload.host_peak_gib == pytest.approx(one + teacher + shards)
    args = ["experiment=videopanda_7b/stage2_pretrain", *GEOMETRY, "llm_preset=vicuna-7b", "gpu=h100_80g"]
    main(args)
    out = capsys.readouterr().out
    assert "host memory per node, planned: node 0 while the initial weights are read and sharded (rank 0 reads them)" in out
    main(args + ["--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["host_readers"] == 1 and out["host_peak_gib"] == pytest.approx(fsdp.host_peak_gib)
    assert out["host_memory_gib"] == pytest.approx(fsdp.host_memory_gib)


def test_a_config_the_planner_refuses_is_one_line_and_exit_2():
    proc = run_cli(["-m", "panda.plan", "experiment=videopanda_7b/stage2_pretrain", *GEOMETRY, "llm_preset=vicuna-7b",
                    "gpu=h100_40g"], check=False)
    assert proc.returncode == 2 and "panda.plan: config error: gpu=h100_40g: use one of" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bug_in_the_planner_keeps_its_traceback(monkeypatch):
    """Only what a config can cause (ValueError, PandaError, OSError, Hydra/OmegaConf errors) is a
    config error; a bug is not reported as one."""
    import panda.plan

    def broken(*args, **kwargs):
        raise TypeError("a bug inside the planner")

    monkeypatch.setattr(panda.plan, "units_of", broken)
    with pytest.raises(TypeError, match="a bug inside the planner"):
        main(["experiment=videopanda_7b/stage2_pretrain", *GEOMETRY, "llm_preset=vicuna-7b"])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llm_flop_formula_matches_the_flop_counter(kv_heads):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=512)
    config._attn_implementation = "eager"  # attention as matmuls the counter sees (CPU sdpa kernels it does not count)
    llm = LlamaForCausalLM(config)
    B, S = 2, 96
    ids = torch.randint(0, 512, (B, S))
    with FlopCounterMode(display=False) as counter:
        llm(input_ids=ids, labels=ids).loss.backward()
    formula = 3 * llm_forward_flops(config, B * S, S, B)  # forward + backward of trained weights
    assert abs(formula / counter.get_total_flops() - 1) < 0.05


def test_planned_peak_matches_a_measured_cpu_training_step():
    """One point of benchmarks/plan_vs_measured.py (the full table is in its output)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import plan_vs_measured as bench

    label, overrides, text = next(p for p in bench.POINTS if p[0] == "D256 L4")
    cfg = bench.compose(bench.COMMON + overrides)
    planned = plan(cfg, gpu="cpu", text_tokens=text, vocab=bench.VOCAB).peak_gib * 1024
    measured = bench.measure(cfg, text)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)


def test_the_mfu_numerator_matches_the_flop_counter_on_a_real_training_step():
    """perf/tflops_per_device counts a micro-batch's model FLOPs from its token counts
    (panda.models.flops.BatchFlops); here against FlopCounterMode over forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from panda.config import StageConfig
    from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
    from panda.models.flops import BatchFlops, stab_forward_flops
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.manual_seed(0)
    stab_cfg = STABConfig(width=32, heads=4, resolution=112, dropout=0.0)
    llm = build_llm(1000, hidden_size=64, layers=2, heads=4, intermediate_size=172, attn_implementation="eager")
    model = VideoLanguageModel(stab_cfg, llm).train()
    B, F, text = 2, 4, 40
    ids = torch.randint(3, 1000, (B, text))
    ids[:, 1:1 + F] = IMAGE_PLACEHOLDER_ID
    labels = ids.clone()
    labels[:, : text - 8] = IGNORE_INDEX
    labels[1, : text - 3] = IGNORE_INDEX
    args = (ids, torch.ones_like(ids), torch.randn(B, F, 3, 112, 112), torch.ones(B, F, 112, 112), labels)
    with FlopCounterMode(display=False) as counter:
        out = model(*args)
        out.loss.backward()
    flops = BatchFlops(model, StageConfig(), stab_forward_flops(stab_cfg, F) / F)
    counted = flops(torch.full((B,), text), out.visual_tokens, (labels[:, 1:] != IGNORE_INDEX).sum(1), F)
    assert abs(counted / counter.get_total_flops() - 1) < 0.05, (counted, counter.get_total_flops())


def test_train_py_on_a_gpu_too_small_stops_before_building_with_the_fix(monkeypatch):
    """No GPU here: torch.cuda's three queries answer as a 24 GiB card would (the only stand-in in
    this file); the check itself, the plan and the message are real."""
    from panda.plan import check_gpu_plan

    cfg = recipe("stage2_pretrain", "trainer=gpu", "trainer.devices=1", "trainer.num_nodes=1")
    assert check_gpu_plan(cfg) is None  # no CUDA: nothing to check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (22 * 2**30, 24 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: "Small GPU 24GB")
    cfg = recipe("stage2_pretrain", "trainer=gpu", "trainer.devices=1", "trainer.num_nodes=1", "llm.pretrained=null",
                 "init.kind=none", "init.path=null", "llm=tiny_llama", "llm.hidden_size=2048", "llm.layers=16",
                 "llm.heads=16", "llm.intermediate_size=5504")  # ~0.9B parameters
    problem = check_gpu_plan(cfg)
    assert problem and "Small GPU 24GB has 22.0 GiB free" in problem and "cheapest fix: " in problem
    assert "trainer.plan_check=false" in problem
    assert check_gpu_plan(dataclasses_replace_trainer(cfg, plan_check=False)) is None


def test_the_gpu_check_skips_a_config_it_cannot_plan_but_not_a_bug(monkeypatch, capsys):
    """The stand-in 24 GiB card of the test above. An LLM folder that is not on this machine: no
    plan, the check says so and the run goes on. A bug in the planner: its traceback."""
    import panda.plan
    from panda.plan import check_gpu_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (22 * 2**30, 24 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: "Small GPU 24GB")
    cfg = recipe("stage2_pretrain", "trainer=gpu", "trainer.devices=1", "trainer.num_nodes=1")  # init.path: not here
    assert check_gpu_plan(cfg) is None
    assert "panda.plan: no memory check (the LLM's folder" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise KeyError("a bug inside the planner")

    monkeypatch.setattr(panda.plan, "llm_config", broken)
    with pytest.raises(KeyError, match="a bug inside the planner"):
        check_gpu_plan(cfg)


def dataclasses_replace_trainer(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **changes))


def test_measuring_flops_leaves_the_random_stream_alone():
    """Building the MFU counter (a throwaway STAB, a matmul rate) before training must not shift
    the run's random numbers (it did: a default run's result changed with it)."""
    from panda.models.flops import measured_matmul_tflops, stab_forward_flops
    from panda.models.stab import STABConfig

    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    stab_forward_flops(STABConfig(width=32, heads=4, resolution=56, patch_size=7, chunk_size=2), 2)
    measured_matmul_tflops(64, 1)
    assert torch.equal(torch.rand(3), want)
