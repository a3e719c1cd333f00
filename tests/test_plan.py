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


# -- long sequences (planned): the sample against one GPU, context parallelism ----------------------------

HOUR_AT_1_FPS = ["data.sampling=fps", "data.max_frames=3600", "data.batch_size=1"]
PLAN_7B = dict(gpu="h100_80g", llm_preset="vicuna-7b")


def test_the_release_sample_fits_one_gpu_without_context_parallelism(capsys):
    """Stage 2 at 8 frames: one line, fits, no CP; the longest sample that fits is longer, and longer
    again at micro-batch 1. The section judges by the plan's own memory model (same peak)."""
    p = plan(recipe("stage2_pretrain"), **PLAN_7B)
    ls = p.long_sequences
    assert ls.planned and ls.fits and ls.fits_one and ls.cp == 1 and ls.mesh is None and not ls.long
    assert ls.positions == p.sequence == 4096 - 8 + 8 * 273 and ls.peak_gib == pytest.approx(p.peak_gib)
    assert ls.tokens_per_frame == 273 and ls.text_positions == 4096 - 8
    assert ls.positions < ls.longest_positions < ls.longest_positions_one and ls.longest_frames % 4 == 0
    assert ls.longest_positions == ls.text_positions + 273 * ls.longest_frames
    main(["experiment=videopanda_7b/stage2_pretrain", *GEOMETRY, "llm_preset=vicuna-7b", "gpu=h100_80g"])
    out = capsys.readouterr().out
    assert "long sequences (planned): a sample of 6,272 positions fits one GPU at micro-batch 8" in out
    assert "no context parallelism needed" in out and "panda does not implement it" not in out


def test_an_hour_at_1_fps_does_not_fit_and_plans_context_parallelism(capsys):
    """3600 frames x 273 tokens: ~1M positions. It does not fit an 80 GB GPU even with checkpointing;
    the fix is the longest sample that fits, and the CP degree whose share fits is planned, with its
    mesh over the 64 GPUs and the K/V each GPU receives per layer."""
    from panda.plan import GIB

    p = plan(recipe("stage2_pretrain", *HOUR_AT_1_FPS), **PLAN_7B)
    ls = p.long_sequences
    assert ls.positions == 4096 - 3600 + 3600 * 273 and ls.frames == 3600 and ls.minutes == pytest.approx(60) and ls.long
    assert not p.fits and not ls.fits and not ls.fits_one and ls.peak_gib == pytest.approx(p.peak_gib)
    assert 0 < ls.longest_positions < ls.positions and ls.longest_frames < 3600
    assert p.fix.startswith(f"data.max_frames={ls.longest_frames} (the longest sample that fits one GPU")
    cp = ls.cp
    assert cp > 1 and ls.cp_peak_gib < p.usable_gib and 64 % cp == 0
    assert ls.mesh == f"64 GPUs = FSDP {64 // cp} x CP {cp}" and ls.cp_nodes == cp // 4
    assert ls.cp_positions_per_gpu * cp >= ls.positions and ls.cp_positions_per_gpu % 2 == 0
    padded = ls.cp_positions_per_gpu * cp  # K and V: 32 heads x 128 = 4096 wide, bf16
    assert ls.kv_exchange_gib["forward"] == pytest.approx(2 * (cp - 1) / cp * padded * 4096 * 2 / GIB)
    assert ls.kv_exchange_gib["backward"] == pytest.approx(ls.kv_exchange_gib["forward"] + 2 * padded * 4096 * 4 / GIB)
    assert ls.kv_exchange_gib["recompute"] == ls.kv_exchange_gib["forward"]
    args = ["experiment=videopanda_7b/stage2_pretrain", *GEOMETRY, *HOUR_AT_1_FPS, "llm_preset=vicuna-7b", "gpu=h100_80g"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "long sequences (planned, not measured; activation checkpointing per decoder layer)" in out
    assert f"context parallelism (planned; panda does not implement it): CP {cp} -> " in out
    assert f"mesh: 64 GPUs = FSDP {64 // cp} x CP {cp}" in out
    main(args + ["--json"])
    js = json.loads(capsys.readouterr().out)["long_sequences"]
    assert js["planned"] is True and js["cp"] == cp and js["longest_positions"] == ls.longest_positions


def test_the_longest_sample_is_the_planners_own_limit_and_grows_with_gpu_memory():
    """A 200K-token budget (732 square frames) on an 80 GB GPU does not fit. Planned at exactly the
    longest sample it reports it fits; 1.1x as many frames does not. More memory, a longer sample."""
    budget = ["data.sampling=budget", "data.max_visual_tokens=200000", "data.max_frames=732", "data.batch_size=1"]
    p = plan(recipe("stage2_pretrain", *budget), **PLAN_7B)
    ls = p.long_sequences
    assert ls.visual_tokens == 732 * 273 <= 200000 and not p.fits and ls.cp > 1
    text = ls.text_positions  # 4096 - 732: held as frames change; model.max_length counts each frame as one

    def at(frames):
        frames = frames // 4 * 4
        return plan(recipe("stage2_pretrain", "data.sampling=budget", f"data.max_visual_tokens={frames * 273}",
                           f"data.max_frames={frames}", f"model.max_length={text + frames}", "data.batch_size=1"), **PLAN_7B)

    exactly, beyond = at(ls.longest_frames), at(int(1.1 * ls.longest_frames))
    assert exactly.sequence == ls.longest_positions and exactly.fits
    assert beyond.sequence > 1.09 * ls.longest_positions and not beyond.fits
    cfg = recipe("stage2_pretrain", *budget)
    longest = [plan(cfg, usable_gib=gib, **PLAN_7B).long_sequences.longest_positions for gib in (40, 79.1, 139.8)]
    assert longest[0] < longest[1] < longest[2] and longest[1] == ls.longest_positions
    assert plan(cfg, gpu="h200", llm_preset="vicuna-7b").long_sequences.longest_positions == longest[2]


@pytest.mark.parametrize("compression", [{}, {"merge_keep": 0.25}, {"temporal_pool": 4}])
def test_visual_tokens_and_stab_cost_scale_with_frames_as_stab_counts_them(compression):
    """The planner's one visual-token count is STAB's, temporal compression included; STAB's cost beyond
    8 frames is scaled from 8, within 1% of running it; K/V exchange uses the key/value heads
    (grouped-query attention)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from panda.models.flops import stab_cost
    from panda.models.stab import STABConfig
    from panda.plan import kv_exchange_bytes, planned_visual_tokens, stab_per_video

    stab = STABConfig(width=32, heads=4, resolution=112, dropout=0.0, **compression)
    cfg = SimpleNamespace(stab=stab)
    flops, saved, tokens = stab_cost(stab, 16)
    assert planned_visual_tokens(cfg, 16) == tokens
    assert (tokens < 16 * stab.max_tokens_per_frame()) == bool(compression)
    scaled_bytes, scaled_flops = stab_per_video(cfg, 16)  # measured on 8 frames
    assert abs(scaled_bytes / saved - 1) < 0.01 and abs(scaled_flops / flops - 1) < 0.01
    gqa = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
    assert kv_exchange_bytes(gqa, 2, 1000, 4)["forward"] == 2 * 3 / 4 * 1000 * 1024 * 2


def test_a_budget_plans_more_frames_with_temporal_compression():
    from panda.plan import planned_frames

    budget = ["data.sampling=budget", "data.max_visual_tokens=2000", "data.max_frames=512"]
    plain = planned_frames(recipe("stage2_pretrain", *budget))
    merged = planned_frames(recipe("stage2_pretrain", *budget, "stab.merge_keep=0.25", "teacher=none"))
    assert 4 <= plain < merged <= 512 and merged % 4 == 0
