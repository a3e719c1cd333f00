"""Memory, FLOPs and time of a training run, before it runs.

    panda plan experiment=videopanda_7b/stage2_pretrain trainer.devices=4 trainer.num_nodes=16 gpu=h100_80g

(``python -m panda.plan ...`` is the same.) Takes the overrides ``panda train`` takes (and its
``--config-dir DIR``), plus ``gpu=`` (a100_80g | h100_80g | h200 | cpu), ``mfu=``
(assumed model-FLOPs utilisation, default 0.4), ``llm_preset=vicuna-7b`` (the LLM's shape when
``init.path`` is not on this machine), ``samples=`` (training samples; default from the data) and
``--json``. The model is built on the meta device (no weights, no memory), so a 7B plans in
seconds; the STAB's activations are measured by running STAB once on one synthetic video of the
configured frames and resolution (its saved-for-backward tensors), the LLM's come from the
formula below. What it counts, per rank:

- **static**: parameters, gradients and AdamW's two moments, as the strategy holds them — DDP
  replicates (and keeps gradient buckets beside the gradients), FSDP2 shards every unit
  ``panda/training/fsdp.py`` builds over the data-parallel ranks (fp32 master weights; frozen
  parts have no gradient or state) and adds the largest unsharded unit twice (the one computing
  and the one prefetched) in the compute dtype, and its gradient in the reduce dtype; with
  ``bf16-mixed`` outside FSDP, autocast's bf16 copy of every weight; the frozen teacher.
- **activations** of one micro-batch (``data.batch_size`` videos, ``frames``, the longest
  sequence: ``model.max_length`` text positions plus the visual tokens): per LLM layer and token
  ``(8 + 2c)·D + c·(3D + 2·Dkv) + 4c·I`` bytes (two RMSNorms, q/k/v, attention output and its copy,
  the gated MLP; ``c`` the compute dtype's bytes), or with activation checkpointing ``c·D`` per
  layer plus one layer recomputed; logits ``(c + 8)·V`` per *supervised* token (the LM head runs
  only where a label is: its output, the fp32 copy and log-softmax); the hidden states the distillation head reads; STAB (measured);
  plus one layer's gradient buffers during backward.

**Host memory per node** (planned, node 0: the one with rank 0) while the initial weights are read
and sharded: the full model as stored (``llm.dtype`` for the LLM, fp32 for the vision side) on each
rank that reads them — one under FSDP (rank 0 reads and sends each rank its shards,
``trainer.fsdp.broadcast_from_rank0``), every rank of the node otherwise; the frozen teacher on every
rank until it moves to the device; with ``trainer.fsdp.cpu_offload`` every rank's sharded parameters,
gradients and AdamW states. The sum is an upper bound: the full model is freed once sharded, before
the gradients and AdamW states exist. The file's own tensors while they are copied in are not counted.

FLOPs are model FLOPs (matmuls, convolutions and attention as ``torch.utils.flop_counter`` counts
them; activation recomputation excluded, as MFU is defined): forward ``2·T·N_linear + 4·L·S²·D``
per sample for the LLM, backward twice that for trained weights and once for the input gradients
a frozen LLM passes to STAB; STAB from ``FlopCounterMode`` on one video, the teacher from its sizes.
STAB is run on at most 8 frames and scaled linearly beyond (its saved bytes and FLOPs are linear in frames).

**Long sequences** (planned; ``Plan.long_sequences``, the output's last section): the sample's
positions (text + the visual tokens of its frames: :func:`planned_visual_tokens`) against one GPU
with activation checkpointing; the longest sample that fits — frames added in whole STAB chunks,
text and answer positions the run's, judged by this same memory model — at the run's micro-batch
and at 1, in frames and minutes at ``data.sample_fps``; and when one sample does not fit, the
smallest power-of-two context-parallel degree ``cp`` whose share does: each GPU holds ``S/cp``
positions (padded to ``2·cp`` load-balanced causal shards) with their activations, logits and STAB
frames, one layer's ring attention buffers (:func:`ring_buffer_bytes`), and the static terms
unchanged (FSDP2 shards over every GPU, CP ranks included); the mesh ``world = FSDP (world/cp) x CP
cp``; the K/V it exchanges per layer (:func:`kv_exchange_bytes`) and how long that takes on the
link against the layer's causal attention. panda does not implement context parallelism.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from panda.errors import PandaError
from panda.models.flops import llm_forward_flops, teacher_forward_flops  # noqa: F401 (re-exported)

GIB = 1024**3
# what a config the planner cannot plan raises: a setting it refuses (ValueError, PandaError) or a file
# it names that cannot be read (OSError); anything else is a bug in panda and keeps its traceback
UNPLANNABLE = (PandaError, ValueError, OSError)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what torch reports as total on the device
    bf16_tflops: float  # dense peak
    link_gbs: float = 0.0  # GB/s a GPU sends to another in its node (NVLink, one direction), planned


GPUS = {
    "a100_80g": GPU("A100-SXM4-80GB", 79.2, 312.0, 300.0),
    "h100_80g": GPU("H100-SXM5-80GB", 79.1, 989.0, 450.0),
    "h200": GPU("H200-SXM-141GB", 139.8, 989.0, 450.0),
    "cpu": GPU("CPU (this machine)", 0.0, 0.0),
}
INTER_NODE_GBS = 50.0  # GB/s a GPU sends to another node (one 400 Gb/s NIC per GPU), planned

# LLM shapes for planning when the folder is not on this machine (config.json values)
LLM_PRESETS = {
    "vicuna-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
}

# training samples of the data configs (docs/recipe-reference.md, "On-disk layout"), before data.fraction
DATA_SAMPLES = {"valley": 702_000, "videochatgpt": 100_000, "valley+videochatgpt": 802_000}


@dataclass
class Unit:
    """One FSDP2 unit (or, under DDP, one group of parameters)."""

    name: str
    params: int
    trained: int  # parameters with gradients and AdamW states: all, none, or (LoRA) the adapters
    dtype_bytes: int  # as stored (master weights)

    @property
    def trainable(self) -> bool:
        return self.trained > 0


@dataclass
class LongSequences:
    """The sample's length against one GPU, and the context parallelism a longer one would need: all
    planned (the planner's memory model with activation checkpointing per decoder layer, whether or
    not the run has it on), nothing measured; panda does not implement context parallelism. Frames
    are square frames (the most visual tokens a frame can cost); text and answer positions stay the
    run's as frames are added."""

    planned: bool = True  # every number here is planned, not measured
    positions: int = 0  # the sample's LLM positions: text + visual tokens
    text_positions: int = 0  # ... of which not visual tokens
    frames: int = 0  # frames through STAB
    visual_tokens: int = 0
    tokens_per_frame: int = 0  # visual tokens of a square frame
    sample_fps: float = 1.0  # data.sample_fps: minutes of video are frames / sample_fps / 60
    minutes: float = 0.0
    micro_batch: int = 1  # data.batch_size
    checkpointing: bool = True  # the run has activation checkpointing on (these numbers assume it on either way)
    long: bool = False  # the sample is long (over LONG_POSITIONS) or does not fit: the output shows the whole section
    fits: bool | None = None  # one micro-batch of the run, with checkpointing, fits one GPU (None: no GPU to judge)
    peak_gib: float | None = None  # its peak per GPU
    fits_one: bool | None = None  # one sample alone (micro-batch 1) fits
    longest_positions: int | None = None  # the longest sample that fits one GPU at the run's micro-batch
    longest_frames: int | None = None  # ... its frames (whole STAB chunks)
    longest_visual_tokens: int | None = None
    longest_minutes: float | None = None
    longest_positions_one: int | None = None  # the same at micro-batch 1
    longest_frames_one: int | None = None
    longest_minutes_one: float | None = None
    cp: int | None = 1  # context-parallel degree one sample needs (micro-batch 1; 1: none, None: no degree fits)
    cp_positions_per_gpu: int | None = None  # S / cp, padded to 2·cp shards (load-balanced causal attention)
    cp_peak_gib: float | None = None  # peak per GPU with it
    mesh: str | None = None  # "64 GPUs = FSDP 4 x CP 16"
    mesh_fsdp: int | None = None  # world / cp: the data-parallel (FSDP) dimension
    cp_nodes: int | None = None  # nodes one CP ring spans
    kv_exchange_gib: dict = field(default_factory=dict)  # per layer, per GPU, per micro-batch: forward / backward / recompute
    kv_link_gbs: float | None = None  # the link the ring's K/V cross (NVLink within a node, else INTER_NODE_GBS)
    kv_forward_ms: float | None = None  # one layer's forward K/V exchange at kv_link_gbs
    attention_forward_ms: float | None = None  # one layer's causal attention forward per GPU at the assumed MFU
    attention_share: float = 0.0  # attention's share of the LLM's forward FLOPs at this length
    layers: int = 0  # decoder layers: the K/V exchange happens once per layer
    notes: list = field(default_factory=list)


@dataclass
class Plan:
    gpu: str
    strategy: str
    world: int
    shard: int  # ranks a unit is sharded over (1 = replicated)
    micro_batch: int
    sequence: int  # LLM positions of the longest sample: text + visual tokens
    visual_tokens: int  # per sample
    memory_gib: dict = field(default_factory=dict)  # component -> GiB per rank
    peak_gib: float = 0.0  # persistent + max(activations, gradients)
    usable_gib: float = 0.0
    margin_gib: float | None = None
    fits: bool | None = None
    fix: str | None = None
    params: dict = field(default_factory=dict)
    flops_per_sample: dict = field(default_factory=dict)
    global_batch: int = 0
    step_s: float | None = None
    samples: int | None = None
    stage_h: float | None = None
    mfu: float = 0.4
    phases: dict = field(default_factory=dict)  # persistent / activations / gradients, GiB
    host_memory_gib: dict = field(default_factory=dict)  # host memory per node (node 0) by item, GiB (planned)
    host_peak_gib: float = 0.0  # their sum: host memory per node while the initial weights are read and sharded
    host_readers: int = 1  # ranks per node that read the initial weights (1: FSDP's rank 0 reads and sends)
    long_sequences: LongSequences | None = None  # the sample's length against one GPU, context parallelism (planned)
    notes: list = field(default_factory=list)


GRADIENT_TERMS = ("gradients", "gradients (sharded)")
ACTIVATION_TERMS = ("LLM activations", "logits + loss (supervised positions)", "backward buffers (one layer)", "embeddings + splice",
                    "distillation head inputs", "STAB + projector activations", "unsharded gradient of a unit",
                    "autocast bf16 weight copies", "ring attention buffers (one layer)")


def phase_of(term: str) -> str:
    """When a memory term is alive: all step long (``persistent``), from the forward until backward
    frees it (``activations``), or from backward until the optimiser step (``gradients``)."""
    if term in GRADIENT_TERMS:
        return "gradients"
    return "activations" if term in ACTIVATION_TERMS else "persistent"


def llm_config(cfg, llm_preset: str | None):
    """The LLM's transformers config: from its folder (``init.path`` / ``llm.pretrained``), a preset,
    or the ``llm.*`` sizes of a built LLM."""
    from transformers import AutoConfig, LlamaConfig

    from panda.config import FOLDER_INITS

    folder = cfg.init.path if cfg.init.kind in FOLDER_INITS else cfg.llm.pretrained
    if llm_preset:
        if llm_preset not in LLM_PRESETS:
            raise ValueError(f"llm_preset={llm_preset}: use one of {sorted(LLM_PRESETS)}")
        return LlamaConfig(**LLM_PRESETS[llm_preset])
    if folder:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"the LLM's folder {folder} is not on this machine: add llm_preset=vicuna-7b to plan the "
                             f"release's LLM, or point {'init.path' if cfg.init.kind in FOLDER_INITS else 'llm.pretrained'} "
                             "at a folder with its config.json")
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
        try:
            return AutoConfig.for_model(**raw)
        except (ValueError, KeyError):
            return LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")})
    return LlamaConfig(hidden_size=cfg.llm.hidden_size, intermediate_size=cfg.llm.intermediate_size,
                       num_hidden_layers=cfg.llm.layers, num_attention_heads=cfg.llm.heads,
                       num_key_value_heads=cfg.llm.kv_heads or cfg.llm.heads, vocab_size=vocab_of(cfg),
                       max_position_embeddings=max(cfg.model.max_length, 256))


def vocab_of(cfg) -> int:
    """The vocabulary of a built LLM: its tokenizer's size when the folder is here, else 32,000."""
    from panda.build import tokenizer_path

    path = tokenizer_path(cfg)
    if os.path.isdir(path):
        from panda.data.tokenizer import load_tokenizer

        return len(load_tokenizer(path))
    return 32000


def meta_model(cfg, config):
    """The VideoLanguageModel of ``cfg`` on the meta device, with the stage's trainable flags."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from panda.config import distill_active
    from panda.models.video_lm import VideoLanguageModel
    from panda.training.module import apply_stage

    with torch.device("meta"):
        llm = LlamaForCausalLM(config) if type(config) is LlamaConfig else AutoModelForCausalLM.from_config(config)
        teacher_width = cfg.teacher.width if distill_active(cfg) else None
        model = VideoLanguageModel(cfg.stab, llm, projector=cfg.model.projector,
                                   distill=cfg.distill if teacher_width else None, teacher_width=teacher_width)
        from panda.models.adapters import apply_adapter

        apply_adapter(llm, cfg.llm)
    apply_stage(model, cfg.stage)
    return model


def units_of(model, llm_bytes: int) -> list[Unit]:
    """The FSDP2 units of ``panda/training/fsdp.py``: each decoder layer, the input embedding, the
    rest of the LLM, and the vision side split by trainable / frozen."""
    from panda.models.llm_parts import decoder_layers

    def count(module):
        return sum(p.numel() for p in module.parameters())

    def trained(module):  # LoRA: only the adapters of a layer
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    layers = decoder_layers(model.llm)
    units = [Unit(f"llm.layer{i}", count(layer), trained(layer), llm_bytes) for i, layer in enumerate(layers)]
    embed = model.llm.get_input_embeddings()
    units.append(Unit("llm.embed", count(embed), trained(embed), llm_bytes))
    rest = count(model.llm) - sum(u.params for u in units)
    head_trains = hasattr(model.llm, "lm_head") and trained(model.llm.lm_head) > 0
    units.append(Unit("llm.rest", rest, rest if head_trains else 0, llm_bytes))
    vision = [m for m in (model.stab, model.projector, model.distill_head) if m is not None]
    for flag in (True, False):
        n = sum(count(m) for m in vision if (trained(m) > 0) == flag)
        if n:
            units.append(Unit(f"vision.{'trainable' if flag else 'frozen'}", n, n if flag else 0, 4))
    return units


_STAB_MEASURED: dict[str, tuple[int, float, int]] = {}
STAB_MEASURED_FRAMES = 8  # STAB is run on at most this many frames (whole chunks); more frames scale linearly


def planned_visual_tokens(cfg, frames: int) -> int:
    """Visual tokens the LLM gets from one video of ``frames`` square frames (a square frame costs the
    most: ``STABConfig.max_tokens_per_frame``, 273 at release sizes), after STAB's temporal compression
    (``stab.merge_keep``, ``stab.temporal_pool``: ``STABConfig.video_tokens``). The one place the planner
    counts them: the run's sample, the longest sample that fits and its frames all come from here."""
    return cfg.stab.video_tokens(frames)


def stab_per_video(cfg, frames: int) -> tuple[float, float]:
    """(activation bytes saved for backward, forward FLOPs) of STAB on one video of ``frames`` square
    frames at its resolution: measured by running STAB once on CPU (remembered per STAB config) on
    ``frames`` frames, or on :data:`STAB_MEASURED_FRAMES` (whole chunks) and scaled linearly when there
    are more (both are linear in frames: release STAB at 4, 8 and 16 frames agree within 0.01%)."""
    from panda.models.flops import stab_cost

    T = cfg.stab.chunk_size
    measured = frames if frames <= STAB_MEASURED_FRAMES else max(T, STAB_MEASURED_FRAMES // T * T)
    key = repr((dataclasses.asdict(cfg.stab), measured))
    if key not in _STAB_MEASURED:
        flops, saved, tokens = stab_cost(cfg.stab, measured)
        _STAB_MEASURED[key] = (saved, flops, tokens)
    saved, flops, _ = _STAB_MEASURED[key]
    return saved * frames / measured, flops * frames / measured


def stab_measure(cfg, micro_batch: int) -> tuple[float, float, int]:
    """(activation bytes saved for backward, forward FLOPs, visual tokens per video) of STAB for
    ``micro_batch`` videos of the configured frames (:func:`stab_per_video`, :func:`planned_visual_tokens`)."""
    saved, flops = stab_per_video(cfg, cfg.frames)
    return saved * micro_batch, flops * micro_batch, planned_visual_tokens(cfg, cfg.frames)


def dtype_bytes(name) -> int:
    """Bytes per element of a config's dtype name (None: as stored, fp32)."""
    return 2 if str(name) in ("bfloat16", "float16") else 4


def llm_layer_bytes_per_token(config, c: int, trains: bool = True) -> int:
    """Bytes one decoder layer saves for backward per token (LLaMA-style: RMSNorm, attention, gated MLP).

    Trained weights: each RMSNorm keeps its fp32 input, its normalised output and (for the next
    linears) the scaled output; attention keeps q, k, v, its output and that output's contiguous
    copy (the o_proj input); the MLP keeps gate, silu(gate), up and their product:
    ``(8 + 7c)·D + 2c·Dkv + 4c·I``. Frozen weights (gradients only flow through, to STAB): no
    linear keeps its input: ``(8 + 2c)·D + 2c·Dkv + 3c·I``.
    """
    d, i = config.hidden_size, config.intermediate_size
    kv = d * (config.num_key_value_heads or config.num_attention_heads) // config.num_attention_heads
    if trains:
        return (8 + 7 * c) * d + 2 * c * kv + 4 * c * i
    return (8 + 2 * c) * d + 2 * c * kv + 3 * c * i


def planned_frames(cfg) -> int:
    """The most frames a video can get under ``data.sampling``: ``frames`` (release); else the most
    whole chunks ``data.max_frames`` allows and, under budget, that the narrowest frame fits."""
    from panda.data.budget import sampling_rule

    rule = sampling_rule(cfg.data, cfg.stab, cfg.frames)
    if rule.mode == "release":
        return cfg.frames
    T = rule.chunk_size
    most = rule.max_frames
    if rule.mode == "budget":  # the narrowest frame: one row of LSD tokens; counted after temporal compression
        from panda.tokens import frames_within

        stab = cfg.stab
        rows, cols = stab.spatial_grid(stab.window, stab.resolution // stab.patch_size)
        most = frames_within(rule.max_visual_tokens, most, T, rows, cols, stab.has_context_token, stab.row_tokens,
                             stab.merge_keep, stab.temporal_pool)
    return max(T, most // T * T)


def plan(cfg, gpu: str = "h100_80g", mfu: float = 0.4, llm_preset: str | None = None, samples: int | None = None,
         text_tokens: int | None = None, vocab: int | None = None, supervised_tokens: int | None = None,
         usable_gib: float | None = None) -> Plan:
    """The plan of ``cfg`` (a TrainConfig). ``text_tokens``: text positions per sample (default the
    longest, ``model.max_length``); ``vocab``: the vocabulary of a built LLM (default its tokenizer's);
    ``supervised_tokens``: answer tokens per sample, where the LM head runs (default every text
    position after the frames: an upper bound); ``usable_gib``: memory per rank to judge against
    (default the ``gpu``'s)."""
    cfg = _with_planned_frames(cfg)
    device = _gpu(gpu)
    config = llm_config(cfg, llm_preset)
    if vocab is not None:
        config.vocab_size = vocab
    model = meta_model(cfg, config)
    layout = _layout(cfg, gpu)
    units = units_of(model, dtype_bytes(cfg.llm.dtype))
    trains = _what_trains(cfg, units)
    teacher_params = _teacher_params(cfg)
    static = _static_memory(cfg, units, layout, teacher_params)  # term -> bytes per rank
    batch = _micro_batch(cfg, text_tokens, supervised_tokens)
    mem = static | _activation_memory(cfg, config, model, layout, batch, trains)
    phases = _phase_bytes(mem)
    peak = _peak_bytes(phases)
    result = Plan(gpu, layout.strategy, layout.world, layout.shard, batch.videos, batch.sequence, batch.visual,
                  {k: v / GIB for k, v in mem.items()}, peak / GIB,
                  device.memory_gib if usable_gib is None else usable_gib, mfu=mfu,
                  phases={k: v / GIB for k, v in phases.items()},
                  params={u.name: u.params for u in units} | {"teacher": teacher_params},
                  flops_per_sample=_flops_per_sample(cfg, config, batch, trains),
                  global_batch=_global_batch(cfg, layout.world), samples=_training_samples(cfg, samples))
    _judge_fit(result, cfg, layout, mem)
    _time_steps(result, device)
    host = _host_memory(cfg, units, layout, teacher_params)
    result.host_memory_gib = {k: v / GIB for k, v in host.items()}
    result.host_peak_gib = sum(host.values()) / GIB
    result.host_readers = _host_readers(cfg, layout)
    result.notes = _notes(cfg, units, trains, batch, text_tokens)
    sizes = _Sizes(cfg, config, model, dataclasses.replace(layout, checkpointing=True), trains, static)
    result.long_sequences = _long_sequences(sizes, batch, result, device, layout)
    _fix_for_a_long_sample(result, cfg, layout, batch, phases)
    return result


@dataclass(frozen=True)
class _Layout:
    """How a run spreads over its ranks and what it computes in."""

    world: int  # ranks in all
    fsdp: bool
    shard: int  # ranks a unit is sharded over (1 = replicated)
    mixed: bool  # trainer.precision bf16 / 16: autocast
    compute_bytes: int  # ``c``: bytes per activation element (FSDP2: its param_dtype, when below fp32)
    checkpointing: bool  # activation checkpointing per decoder layer (model. or trainer.fsdp.)
    per_node: int = 1  # ranks per node

    @property
    def strategy(self) -> str:
        return "fsdp" if self.fsdp else ("ddp" if self.world > 1 else "single")


@dataclass(frozen=True)
class _Trains:
    """Which parts of the model get gradients (a LoRA-adapted part counts: its adapters train)."""

    llm_layers: bool  # a decoder layer
    llm: bool  # any part of the LLM
    vision: bool  # STAB, the projector or the distillation head
    lora: bool  # llm.adapter: the LLM's own weights stay frozen


@dataclass(frozen=True)
class _MicroBatch:
    """The micro-batch the plan is for: ``data.batch_size`` videos of the longest sample."""

    videos: int  # B
    visual: int  # visual tokens per sample (under data.sampling=budget, at most the budget)
    sequence: int  # S: LLM positions per sample, text + visual tokens
    supervised: int  # positions per sample where the LM head runs (answer tokens)
    stab_bytes: float  # what STAB saves for backward, all B videos (measured in fp32)
    stab_flops: float  # STAB's forward FLOPs, all B videos

    @property
    def tokens(self) -> int:
        """T = B·S: LLM positions of the micro-batch."""
        return self.videos * self.sequence


def _with_planned_frames(cfg):
    """``cfg`` with the most frames a video can get (:func:`planned_frames`): under data.sampling
    fps / budget the plan is for those."""
    frames = planned_frames(cfg)
    if frames != cfg.frames:
        cfg = dataclasses.replace(cfg, frames=frames)
    return cfg


def _gpu(name: str) -> GPU:
    """The :data:`GPUS` entry ``gpu=`` names (a ValueError naming the choices for another)."""
    if name not in GPUS:
        raise ValueError(f"gpu={name}: use one of {sorted(GPUS)}")
    return GPUS[name]


def _layout(cfg, gpu: str) -> _Layout:
    """Ranks, sharding and compute dtype of ``cfg.trainer`` on ``gpu``: a GPU plan with
    ``trainer.devices`` not a positive count assumes 8 GPUs a node; a CPU plan counts as training does."""
    from panda.training.trainer import count_devices

    t = cfg.trainer
    per_node = count_devices(t.devices, t.accelerator) if gpu == "cpu" or t.accelerator == "cpu" else (
        t.devices if isinstance(t.devices, int) and t.devices > 0 else 8)
    world = per_node * t.num_nodes
    fsdp = str(t.strategy) == "fsdp"
    shard = (per_node if t.fsdp.hybrid_shard else world) if fsdp else 1
    mixed = str(t.precision).startswith(("bf16", "16"))
    c = 2 if mixed else 4
    if fsdp:
        compute = dtype_bytes(t.fsdp.param_dtype)
        c = compute if compute < 4 else c
    checkpointing = cfg.model.gradient_checkpointing or (fsdp and t.fsdp.activation_checkpointing)
    return _Layout(world, fsdp, shard, mixed, c, checkpointing, per_node)


def _what_trains(cfg, units: list[Unit]) -> _Trains:
    """Which parts get gradients, from the stage's units."""
    return _Trains(llm_layers=any(u.trainable for u in units if u.name.startswith("llm.layer")),
                   llm=any(u.trainable for u in units if u.name.startswith("llm.")),
                   vision=any(u.trainable for u in units if u.name == "vision.trainable"),
                   lora=str(cfg.llm.adapter) != "none")


def _teacher_params(cfg) -> int:
    """Parameters of the frozen teacher (0 without distillation): per layer up to the one it reads
    (width ``w``), attention ``4·w²``, MLP ``2·w·I``, temporal embedding ``frames·w`` and temporal
    attention ``4·w²``; plus the patch embedding ``3·p²·w``."""
    from panda.config import distill_active

    if not distill_active(cfg):
        return 0
    from panda.models.teachers import _hidden_index

    tc = cfg.teacher
    depth = _hidden_index(tc.feature_layer, tc.layers)
    return depth * (4 * tc.width * tc.width + 2 * tc.width * tc.intermediate_size + tc.num_frames * tc.width
                    + 4 * tc.width * tc.width) + tc.width * 3 * tc.patch_size ** 2


def _static_memory(cfg, units: list[Unit], layout: _Layout, teacher_params: int) -> dict[str, float]:
    """Bytes per rank of the weights and what training keeps for them (the module docstring's
    **static**): FSDP2 shards parameters, gradients and AdamW's two moments over ``layout.shard``
    ranks (none stay on the GPU under cpu_offload) and holds the largest unit unsharded twice; DDP
    replicates them, with gradient buckets beside the gradients and, under mixed precision,
    autocast's bf16 weight copies; then the frozen teacher."""
    from panda.config import distill_active

    t = cfg.trainer
    trainable = [u for u in units if u.trainable]
    param_bytes = sum(u.params * u.dtype_bytes for u in units)
    grad_bytes = sum(u.trained * u.dtype_bytes for u in trainable)
    adam_bytes = sum(2 * u.trained * u.dtype_bytes for u in trainable)
    mem: dict[str, float] = {}
    if layout.fsdp:
        offload = t.fsdp.cpu_offload
        mem["parameters (sharded)"] = 0 if offload else param_bytes / layout.shard
        mem["gradients (sharded)"] = 0 if offload else grad_bytes / layout.shard
        mem["AdamW states (sharded)"] = 0 if offload else adam_bytes / layout.shard
        compute, reduce = dtype_bytes(t.fsdp.param_dtype), dtype_bytes(t.fsdp.reduce_dtype)
        largest = max(units, key=lambda u: u.params)
        largest_trained = max((u.trained for u in trainable), default=0)
        if layout.shard > 1:
            mem["all-gathered units (2 x largest)"] = 2 * largest.params * compute
            mem["unsharded gradient of a unit"] = largest_trained * reduce
    else:
        mem["parameters"] = param_bytes
        mem["gradients"] = grad_bytes
        mem["AdamW states"] = adam_bytes
        if layout.world > 1:
            mem["DDP gradient buckets"] = grad_bytes
        if layout.mixed:  # autocast keeps a bf16 copy of every fp32-stored weight it casts (the embedding is not cast)
            mem["autocast bf16 weight copies"] = sum(u.params for u in units if u.name != "llm.embed" and u.dtype_bytes == 4) * 2
    if distill_active(cfg):
        mem["frozen teacher"] = teacher_params * dtype_bytes(cfg.teacher.dtype)
    return mem


def _host_readers(cfg, layout: _Layout) -> int:
    """Ranks per node that read the initial weights and hold the full model: under FSDP with
    ``trainer.fsdp.broadcast_from_rank0`` only rank 0 (panda/training/fsdp.py; QLoRA excepted),
    otherwise every rank."""
    t = cfg.trainer
    if layout.fsdp and t.fsdp.broadcast_from_rank0 and str(cfg.llm.adapter) != "qlora" and layout.world > 1:
        return 1
    return layout.per_node


def _host_memory(cfg, units: list[Unit], layout: _Layout, teacher_params: int) -> dict[str, float]:
    """Bytes of host memory on node 0 while the initial weights are read and sharded (the module
    docstring's **host memory per node**)."""
    from panda.config import distill_active

    t = cfg.trainer
    param_bytes = sum(u.params * u.dtype_bytes for u in units)
    readers = _host_readers(cfg, layout)
    mem = {("full model on the reading rank" if readers == 1 else "full model on every rank"): param_bytes * readers}
    if distill_active(cfg):
        mem["frozen teacher (every rank)"] = teacher_params * dtype_bytes(cfg.teacher.dtype) * layout.per_node
    if layout.fsdp and t.fsdp.cpu_offload:
        trained = sum(u.trained * u.dtype_bytes for u in units)
        mem["offloaded shards: parameters, gradients, AdamW (every rank)"] = (
            (param_bytes + 3 * trained) / layout.shard * layout.per_node)
    return mem


def _micro_batch(cfg, text_tokens: int | None, supervised_tokens: int | None) -> _MicroBatch:
    """The longest micro-batch: ``text_tokens`` text positions (default ``model.max_length``), and
    the visual tokens STAB makes of the planned frames (:func:`planned_visual_tokens`; STAB's cost
    measured: :func:`stab_measure`)."""
    B = cfg.data.batch_size
    stab_bytes, stab_flops, visual = stab_measure(cfg, B)
    if str(cfg.data.sampling) == "budget":
        visual = min(visual, cfg.data.max_visual_tokens)  # the LLM never gets more than the budget
    text = text_tokens if text_tokens is not None else cfg.model.max_length
    if str(cfg.model.tokenization) == "release":
        S = text - cfg.frames + visual  # each frame's placeholder position becomes its visual tokens
    else:
        S = text
    supervised = supervised_tokens if supervised_tokens is not None else text - cfg.frames
    return _MicroBatch(B, visual, S, supervised, stab_bytes, stab_flops)


def _activation_memory(cfg, config, model, layout: _Layout, batch: _MicroBatch, trains: _Trains) -> dict[str, float]:
    """Bytes per rank the forward of one micro-batch keeps for backward, and backward's buffers
    (the module docstring's **activations**); ``c`` bytes per element, ``T`` positions, width ``D``."""
    from panda.config import distill_active

    c, B, T = layout.compute_bytes, batch.videos, batch.tokens
    D, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    layer = llm_layer_bytes_per_token(config, c, trains=trains.llm_layers)
    mem: dict[str, float] = {}
    if trains.llm or trains.vision:  # gradients flow back through the LLM: to its weights, or on to STAB
        mem["LLM activations"] = (L * c * D + layer) * T if layout.checkpointing else L * layer * T
        mem["logits + loss (supervised positions)"] = (c + 8) * V * B * batch.supervised
        mem["backward buffers (one layer)"] = 2 * c * (D + config.intermediate_size) * T
    else:
        mem["LLM activations"] = 0
    mem["embeddings + splice"] = 2 * c * D * T
    if model.distill_head is not None and distill_active(cfg):
        picked = len(model.distill_head.layers)
        vis_tokens = B * batch.visual
        mem["distillation head inputs"] = picked * vis_tokens * (c * D * 2 + c * cfg.teacher.width * 2)
    mem["STAB + projector activations"] = batch.stab_bytes * (c / 4) + B * batch.visual * c * (cfg.stab.width + 2 * D)
    return mem


def _peak_bytes(phases: dict[str, float]) -> float:
    """The peak per rank: backward frees the activations layer by layer as it fills the gradients,
    so the two never peak together: ``persistent + max(activations, gradients)``."""
    return phases["persistent"] + max(phases["activations"], phases["gradients"])


def _phase_bytes(mem: dict[str, float]) -> dict[str, float]:
    """Bytes per rank alive in each phase (:func:`phase_of`): persistent, activations, gradients."""
    phases = {k: phase_of(k) for k in mem}
    return {phase: sum(v for k, v in mem.items() if phases[k] == phase)
            for phase in ("persistent", "activations", "gradients")}


def _flops_per_sample(cfg, config, batch: _MicroBatch, trains: _Trains) -> dict[str, float]:
    """Model FLOPs per sample, by part: the forwards, the backwards of what trains or passes
    gradients on (twice a forward for trained weights, once for input gradients only), the teacher."""
    from panda.config import distill_active

    D = config.hidden_size
    # the LM head runs where labels are
    llm_fwd = llm_forward_flops(config, batch.sequence, batch.sequence, 1, head_tokens=batch.supervised)
    stab_fwd = batch.stab_flops / batch.videos + 2 * batch.visual * (cfg.stab.width * D + D * D)  # + the projector's two linears
    flops = {"LLM forward": llm_fwd, "STAB + projector forward": stab_fwd}
    if trains.llm and trains.lora:  # input gradients through every layer; the adapters' own weight gradients are tiny
        flops["LLM backward (input gradients + adapters)"] = llm_fwd
    elif trains.llm:
        flops["LLM backward"] = 2 * llm_fwd
    elif trains.vision:
        flops["LLM backward (input gradients only)"] = llm_fwd
    if trains.vision:
        flops["STAB + projector backward"] = 2 * stab_fwd
    if distill_active(cfg):
        flops["teacher forward"] = teacher_forward_flops(cfg.teacher, cfg.frames)
    return flops


def _global_batch(cfg, world: int) -> int:
    """Samples per optimiser step: micro-batch x ranks x accumulation (when the accumulation does
    not resolve, ``trainer.global_batch_size``, else one micro-batch per rank)."""
    from panda.training.trainer import resolve_accumulation

    B = cfg.data.batch_size
    try:
        return B * world * resolve_accumulation(cfg)
    except ValueError:
        return cfg.trainer.global_batch_size or B * world


def _training_samples(cfg, samples: int | None) -> int | None:
    """The stage's training samples: ``samples=``, else the data config's (:data:`DATA_SAMPLES`)
    times ``data.fraction``; None when neither is known."""
    if samples is None and cfg.data.name in DATA_SAMPLES:
        return int(DATA_SAMPLES[cfg.data.name] * cfg.data.fraction)
    return samples


def _judge_fit(result: Plan, cfg, layout: _Layout, mem: dict[str, float]) -> None:
    """The verdict against the usable memory (none when it is 0, as on ``gpu=cpu``): the margin,
    whether the peak fits, and when it does not, the cheapest fix."""
    if result.usable_gib:
        result.margin_gib = result.usable_gib - result.peak_gib
        result.fits = result.margin_gib > 0
        if not result.fits:
            result.fix = cheapest_fix(cfg, layout.fsdp, layout.checkpointing, mem)


def _time_steps(result: Plan, device: GPU) -> None:
    """Seconds per optimiser step at the assumed MFU and, with a sample count, hours for the stage
    (none on a device without a bf16 peak)."""
    if device.bf16_tflops:
        per_sample = sum(result.flops_per_sample.values())
        result.step_s = per_sample * result.global_batch / (result.world * device.bf16_tflops * 1e12 * result.mfu)
        if result.samples:
            result.stage_h = math.ceil(result.samples / result.global_batch) * result.step_s / 3600


def _notes(cfg, units: list[Unit], trains: _Trains, batch: _MicroBatch, text_tokens: int | None) -> list[str]:
    """What a reader of the plan should know: the adapters that train under LoRA, which sample the
    sequence is, the frames planned for under data.sampling fps / budget."""
    notes = []
    if trains.lora:
        adapters = sum(u.trained for u in units if u.name.startswith("llm."))
        notes.append(f"llm.adapter={cfg.llm.adapter}: {adapters:,} adapter parameters train (rank {cfg.llm.lora.rank}); "
                     f"the LLM's own {sum(u.params for u in units if u.name.startswith('llm.')) - adapters:,} get no "
                     f"gradients or AdamW states")
    if text_tokens is None:
        notes.append(f"sequence = the longest sample: model.max_length={cfg.model.max_length} text positions "
                     f"+ {cfg.frames} frames x {batch.visual // cfg.frames} visual tokens")
    if str(cfg.data.sampling) != "release":
        notes.append(f"data.sampling={cfg.data.sampling}: planned for the most a video can get, {cfg.frames} frames "
                     f"through STAB and {batch.visual} visual tokens for the LLM")
    return notes


# -- long sequences: the sample's length against one GPU, and context parallelism (planned) -------------

LONG_POSITIONS = 32_768  # a sample longer than this (or one that does not fit) gets the whole "long sequences" section
CP_DEGREES = tuple(2**k for k in range(1, 17))  # context-parallel degrees tried, smallest first


@dataclass(frozen=True)
class _Sizes:
    """The planner's memory model with what stays fixed as the sample changes: the static terms
    (weights, gradients, AdamW states as the strategy holds them) and the layout, with activation
    checkpointing on."""

    cfg: object
    config: object
    model: object
    layout: _Layout
    trains: _Trains
    static: dict

    def memory(self, batch: _MicroBatch, cp: int = 1) -> dict[str, float]:
        """Bytes per rank of ``batch`` with each sample split over ``cp`` context-parallel ranks: a
        rank holds S/cp positions (S padded to 2·cp shards: the load-balanced causal split), its
        share of the supervised and visual tokens and of STAB's frames, and one layer's ring
        attention buffers (:func:`ring_buffer_bytes`); the static terms stay (FSDP2 shards over
        every rank, the CP ranks included)."""
        if cp > 1:
            share = math.ceil(batch.sequence / (2 * cp)) * 2
            batch = _MicroBatch(batch.videos, math.ceil(batch.visual / cp), share, math.ceil(batch.supervised / cp),
                                batch.stab_bytes / cp, batch.stab_flops / cp)
        mem = self.static | _activation_memory(self.cfg, self.config, self.model, self.layout, batch, self.trains)
        if cp > 1:
            mem["ring attention buffers (one layer)"] = ring_buffer_bytes(self.config, self.layout.compute_bytes,
                                                                        batch.tokens)
        return mem

    def peak_gib(self, batch: _MicroBatch, cp: int = 1) -> float:
        return _peak_bytes(_phase_bytes(self.memory(batch, cp))) / GIB

    def sample(self, frames: int, text: int, supervised: int, videos: int) -> _MicroBatch:
        """``videos`` samples of ``frames`` square frames, ``text`` positions besides the visual
        tokens and ``supervised`` answer positions: what :func:`plan` makes of a release-tokenised
        run with these frames and ``model.max_length`` = ``text + frames``."""
        visual = planned_visual_tokens(self.cfg, frames)
        saved, flops = stab_per_video(self.cfg, frames)
        return _MicroBatch(videos, visual, text + visual, supervised, saved * videos, flops * videos)


def kv_dim(config) -> int:
    """Width of K (and of V) per position: key/value heads x head dimension."""
    heads = config.num_attention_heads
    return config.hidden_size * (getattr(config, "num_key_value_heads", None) or heads) // heads


def ring_buffer_bytes(config, c: int, positions: int) -> int:
    """One layer's ring-attention buffers on a rank holding ``positions`` positions (torch's
    ``context_parallel`` with ``set_rotate_method("alltoall")``): the K/V chunk it holds and the one
    arriving ``2·2c·Dkv``; in backward the fp32 dQ accumulator ``4·D``, the dK/dV accumulators and
    the copy in flight ``16·Dkv``, and one step's dQ, dK, dV ``c·(D + 2·Dkv)``; per position."""
    D, kv = config.hidden_size, kv_dim(config)
    return positions * (4 * c * kv + 4 * D + 16 * kv + c * (D + 2 * kv))


def kv_exchange_bytes(config, c: int, sequence: int, cp: int, checkpointing: bool = True) -> dict[str, float]:
    """Bytes one rank receives per decoder layer and sample under ring attention over ``cp`` ranks
    (``sequence`` positions, K and V ``Dkv`` wide in ``c`` bytes): forward ``2·(cp−1)/cp·S·Dkv·c``
    (every other rank's K and V); backward the same K/V again plus the dK/dV accumulators that travel
    the whole ring in fp32, ``2·S·Dkv·4``; with activation checkpointing the forward once more."""
    kv = kv_dim(config)
    forward = 2 * (cp - 1) / cp * sequence * kv * c
    out = {"forward": forward, "backward": forward + 2 * sequence * kv * 4}
    if checkpointing:
        out["recompute"] = forward
    return out


def _longest_frames(sizes: _Sizes, text: int, supervised: int, videos: int, usable_gib: float) -> int | None:
    """The most frames (whole STAB chunks) of a sample that fit ``usable_gib`` per GPU at micro-batch
    ``videos``; None when one chunk does not. The memory only grows with frames: doubling, then bisection."""
    T = sizes.cfg.stab.chunk_size

    def fits(chunks: int) -> bool:
        return sizes.peak_gib(sizes.sample(chunks * T, text, supervised, videos)) < usable_gib

    if not fits(1):
        return None
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
        if high > 2**24:
            return low * T
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * T


def _long_sequences(sizes: _Sizes, batch: _MicroBatch, result: Plan, device: GPU, layout: _Layout) -> LongSequences:
    """The run's sample against one GPU with activation checkpointing, the longest that fits (at the
    run's micro-batch and at 1), and when one sample does not fit, the context-parallel degree that
    would make its share fit (planned; :class:`LongSequences`)."""
    cfg, config = sizes.cfg, sizes.config
    fps = cfg.data.sample_fps
    text = batch.sequence - batch.visual  # positions besides the visual tokens: held as frames are added
    B = batch.videos
    one = dataclasses.replace(batch, videos=1, stab_bytes=batch.stab_bytes / B, stab_flops=batch.stab_flops / B)
    S, D, L = batch.sequence, config.hidden_size, config.num_hidden_layers
    attention = 4 * L * S * S * D
    out = LongSequences(positions=S, text_positions=text, frames=cfg.frames, visual_tokens=batch.visual,
                        tokens_per_frame=planned_visual_tokens(cfg, 1), sample_fps=fps,
                        minutes=cfg.frames / fps / 60, micro_batch=B, checkpointing=layout.checkpointing, layers=L,
                        attention_share=attention / llm_forward_flops(config, S, S, 1, head_tokens=batch.supervised))
    usable = result.usable_gib
    if usable:
        out.peak_gib = sizes.peak_gib(batch)
        out.fits = out.peak_gib < usable
        out.fits_one = sizes.peak_gib(one) < usable
        for suffix, videos in (("", B), ("_one", 1)):
            frames = _longest_frames(sizes, max(text, 0), batch.supervised, videos, usable)
            if frames is not None:
                setattr(out, f"longest_frames{suffix}", frames)
                setattr(out, f"longest_positions{suffix}", max(text, 0) + planned_visual_tokens(cfg, frames))
                setattr(out, f"longest_minutes{suffix}", frames / fps / 60)
                if not suffix:
                    out.longest_visual_tokens = planned_visual_tokens(cfg, frames)
        if not out.fits_one:
            out.cp = next((cp for cp in CP_DEGREES if cp <= S and sizes.peak_gib(one, cp) < usable), None)
    out.long = out.fits is False or S > LONG_POSITIONS
    if out.cp and out.cp > 1:
        cp = out.cp
        padded = math.ceil(S / (2 * cp)) * 2 * cp
        out.cp_positions_per_gpu = padded // cp
        out.cp_peak_gib = sizes.peak_gib(one, cp)
        out.kv_exchange_gib = {k: v / GIB for k, v in kv_exchange_bytes(config, layout.compute_bytes, padded, cp).items()}
        out.cp_nodes = math.ceil(cp / layout.per_node)
        if layout.world % cp == 0:
            out.mesh_fsdp = layout.world // cp
            out.mesh = f"{layout.world} GPUs = FSDP {out.mesh_fsdp} x CP {cp}"
        else:
            out.mesh = f"{layout.world} GPUs is not a multiple of CP {cp}: {math.ceil(layout.world / cp) * cp} would be"
        out.kv_link_gbs = (device.link_gbs if cp <= layout.per_node else INTER_NODE_GBS) or None
        if out.kv_link_gbs:
            out.kv_forward_ms = kv_exchange_bytes(config, layout.compute_bytes, padded, cp)["forward"] / (out.kv_link_gbs * 1e9) * 1e3
        if device.bf16_tflops:  # causal: half the S x S products the FLOP count has
            out.attention_forward_ms = 2 * padded * padded * D / cp / (device.bf16_tflops * 1e12 * result.mfu) * 1e3
    out.notes = _long_notes(cfg, config, layout, batch, out, result.global_batch)
    return out


def _long_notes(cfg, config, layout: _Layout, batch: _MicroBatch, out: LongSequences, global_batch: int) -> list[str]:
    """What the long-sequence numbers assume, and what the run's settings change about them."""
    notes = []
    S, c = batch.sequence, layout.compute_bytes
    if not layout.checkpointing:
        notes.append("activation checkpointing is off in this run; these numbers assume it on "
                     "(model.gradient_checkpointing=true, or trainer.fsdp.activation_checkpointing=true under trainer=fsdp)")
    if str(cfg.llm.attn_implementation) == "eager":
        scores = batch.videos * config.num_attention_heads * S * S * c
        notes.append(f"llm.attn_implementation=eager holds the {batch.videos} x {config.num_attention_heads} x S x S "
                     f"attention scores per layer ({scores / GIB:,.1f} GiB at this length), which the plan leaves out: "
                     "it assumes sdpa or flash_attention_2 (memory linear in S)")
    max_positions = getattr(config, "max_position_embeddings", None)
    if out.long and max_positions and S > max_positions:
        notes.append(f"{S:,} positions is beyond the LLM's max_position_embeddings ({max_positions:,}): whether it "
                     "attends that far (RoPE scaling, a long-context LLM) is not the planner's to say")
    if str(cfg.model.tokenization) != "release" and batch.visual > cfg.model.max_length:
        notes.append(f"model.tokenization={cfg.model.tokenization} skips samples over model.max_length={cfg.model.max_length}: "
                     f"{batch.visual:,} visual tokens need model.max_length >= {batch.visual + 1:,}")
    if out.cp and out.cp > 1:
        kv, cp = kv_dim(config), out.cp
        gathered = 2 * S * kv * c
        notes.append(f"context parallelism is planned with torch's ring rotation (set_rotate_method('alltoall')); its "
                     f"default, allgather, holds every layer's whole K and V on each GPU: +{gathered / GIB:,.1f} GiB")
        notes.append(f"the plan has each GPU splice only its share of the sequence; splicing the whole sample and "
                     f"then sharding it holds its {S:,} x {config.hidden_size} embeddings ({S * config.hidden_size * c / GIB:,.1f} GiB) "
                     "on every GPU first")
        if out.cp_nodes and out.cp_nodes > 1:
            notes.append(f"CP {cp} spans {out.cp_nodes} nodes of {layout.per_node} GPUs: the K/V ring crosses the "
                         f"network between nodes (planned at {INTER_NODE_GBS:.0f} GB/s a GPU)")
        if out.mesh_fsdp:
            notes.append(f"the data-parallel degree is world / CP = {out.mesh_fsdp}: a global batch of {global_batch} is "
                         f"{math.ceil(global_batch / out.mesh_fsdp)} accumulated micro-batches of one sample per CP group")
    return notes


def _fix_for_a_long_sample(result: Plan, cfg, layout: _Layout, batch: _MicroBatch, phases: dict[str, float]) -> None:
    """When one sample's activations alone outgrow the GPU (checkpointing on, micro-batch 1), offloading
    the weights cannot help: the fix is a shorter sample, naming the longest that fits and the
    context-parallel degree (planned) beyond it."""
    long = result.long_sequences
    if (result.fits is not False or not layout.checkpointing or batch.videos != 1 or long is None
            or phases["activations"] / GIB < result.usable_gib):
        return
    beyond = (f"; longer needs context parallelism, CP {long.cp} (planned: panda does not implement it)"
              if long.cp and long.cp > 1 else "")
    if long.longest_frames is None:
        result.fix = f"no sample fits one GPU even with one STAB chunk{beyond}"
        return
    F = long.longest_frames
    sampling = str(cfg.data.sampling)
    keys = {"release": f"frames={F}", "fps": f"data.max_frames={F}",
            "budget": f"data.max_visual_tokens={long.longest_visual_tokens} data.max_frames={F}"}[sampling]
    result.fix = (f"{keys} (the longest sample that fits one GPU: {long.longest_positions:,} positions, "
                  f"{long.longest_minutes:.1f} min at {long.sample_fps:g} fps){beyond}")


def check_gpu_plan(cfg) -> str | None:
    """On a CUDA machine (``trainer.accelerator`` gpu/cuda/auto, ``trainer.plan_check``): the
    planner's peak per rank against the first GPU's free memory. Returns the reason it cannot fit
    (with the planner's fix), or None — also when there is no GPU or the plan cannot be made."""
    if not cfg.trainer.plan_check or cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    try:
        p = plan(cfg, gpu="cpu", usable_gib=free / GIB)
    except UNPLANNABLE as exc:  # the plan needs what a run has anyway; when it cannot be made, train and see
        print(f"panda.plan: no memory check ({exc})", file=sys.stderr)
        return None
    name = torch.cuda.get_device_name(0)
    if p.fits:
        print(f"panda.plan: {p.peak_gib:.1f} GiB per rank planned, {free / GIB:.1f} GiB free on {name}", file=sys.stderr)
        return None
    return (f"the plan needs {p.peak_gib:.1f} GiB per rank, {name} has {free / GIB:.1f} GiB free "
            f"of {total / GIB:.1f}; cheapest fix: {p.fix} (python -m panda.plan with the same overrides shows the table; "
            f"trainer.plan_check=false skips this check)")


def cheapest_fix(cfg, fsdp: bool, ckpt: bool, mem: dict) -> str:
    static = sum(v for k, v in mem.items() if k.startswith(("param", "grad", "Adam", "DDP", "autocast")))
    activations = sum(mem.values()) - static
    if not fsdp and static > activations:
        return "trainer=fsdp (shard parameters, gradients and optimiser states over the ranks)"
    if not ckpt:
        return "model.gradient_checkpointing=true (keep one hidden state per layer, recompute the rest)"
    if cfg.data.batch_size > 1:
        return (f"data.batch_size={cfg.data.batch_size // 2} (trainer.global_batch_size stays; accumulation doubles)")
    return "trainer.fsdp.cpu_offload=true (parameters, gradients and optimiser states in host memory)"


def render(p: Plan) -> str:
    lines = [f"plan: {p.strategy} on {p.world} x {GPUS[p.gpu].name}" + (f", units sharded over {p.shard} ranks" if p.shard > 1 else ""),
             f"micro-batch {p.micro_batch} x {p.sequence} LLM positions ({p.visual_tokens} visual tokens per sample)",
             "", "memory per rank                         GiB"]
    for k, v in p.memory_gib.items():
        lines.append(f"  {k:<36} {v:8.2f}")
    ph = p.phases
    lines.append(f"  {'peak':<36} {p.peak_gib:8.2f}   = persistent {ph['persistent']:.2f} + max(activations "
                 f"{ph['activations']:.2f}, gradients {ph['gradients']:.2f})")
    if p.fits is not None:
        verdict = (f"fits with {p.margin_gib:.1f} GiB margin of {p.usable_gib:.1f}" if p.fits
                   else f"DOES NOT FIT: {-p.margin_gib:.1f} GiB over {p.usable_gib:.1f}; cheapest fix: {p.fix}")
        lines.append(f"  verdict: {verdict}")
    lines += ["", "FLOPs per sample (model FLOPs)          TFLOP"]
    for k, v in p.flops_per_sample.items():
        lines.append(f"  {k:<36} {v / 1e12:10.3f}")
    readers = "rank 0 reads them" if p.host_readers == 1 else f"each of the node's {p.host_readers} ranks reads them"
    lines += ["", f"host memory per node, planned: node 0 while the initial weights are read and sharded ({readers})"]
    for k, v in p.host_memory_gib.items():
        lines.append(f"  {k:<36} {v:8.2f}")
    lines.append(f"  {'host peak per node':<36} {p.host_peak_gib:8.2f}")
    if p.step_s is not None:
        lines += ["", f"global batch {p.global_batch}: {p.step_s:.2f} s per optimiser step at {p.mfu:.0%} MFU"
                  + (f"; {p.samples:,d} samples -> {p.stage_h:.1f} h" if p.stage_h is not None else "")]
    lines += [f"note: {n}" for n in p.notes]
    if p.long_sequences is not None:
        lines += ["", *render_long(p.long_sequences, p)]
    return "\n".join(lines)


def _frames_text(frames: int, minutes: float, fps: float) -> str:
    return f"{frames:,} frames, {minutes:,.1f} min at {fps:g} fps"


def render_long(ls: LongSequences, p: Plan) -> list[str]:
    """The "long sequences" section: one line while the sample is short and fits, all of it otherwise."""
    assumed = "" if ls.checkpointing else ", assuming activation checkpointing"
    longest = (f"{ls.longest_positions:,} positions = {_frames_text(ls.longest_frames, ls.longest_minutes, ls.sample_fps)}"
               if ls.longest_positions is not None else "none (not even one STAB chunk)")
    if not ls.long:
        if ls.fits is None:
            return [f"long sequences (planned): a sample of {ls.positions:,} positions; no GPU to judge it against"]
        one = (f"; at micro-batch 1: {ls.longest_positions_one:,} positions = "
               f"{_frames_text(ls.longest_frames_one, ls.longest_minutes_one, ls.sample_fps)}"
               if ls.micro_batch > 1 and ls.longest_positions_one is not None else "")
        return [f"long sequences (planned): a sample of {ls.positions:,} positions fits one GPU at micro-batch "
                f"{ls.micro_batch}{assumed}; the longest that fits: {longest}{one}; no context parallelism needed"]
    lines = [f"long sequences (planned, not measured; activation checkpointing per decoder layer{assumed})",
             f"  sample: {ls.positions:,} LLM positions = {ls.text_positions:,} text + {ls.visual_tokens:,} visual tokens "
             f"({_frames_text(ls.frames, ls.minutes, ls.sample_fps)}); attention is {ls.attention_share:.0%} of the "
             "LLM's forward FLOPs"]
    if ls.fits is None:
        lines.append("  no GPU to judge it against (gpu=cpu)")
    else:
        verdict = "fits" if ls.fits else "DOES NOT FIT"
        lines.append(f"  one GPU, micro-batch {ls.micro_batch}: {verdict}: {ls.peak_gib:,.1f} GiB planned of {p.usable_gib:.1f}")
        lines.append(f"  longest sample that fits one GPU, micro-batch {ls.micro_batch}: {longest}")
        if ls.micro_batch > 1 and ls.longest_positions_one is not None:
            lines.append(f"  ... at micro-batch 1 (data.batch_size=1): {ls.longest_positions_one:,} positions = "
                         f"{_frames_text(ls.longest_frames_one, ls.longest_minutes_one, ls.sample_fps)}")
        if ls.fits_one:
            lines.append("  context parallelism: not needed (one sample fits one GPU)")
        elif ls.cp is None:
            lines.append(f"  context parallelism (planned): no degree up to {CP_DEGREES[-1]} fits; the weights' share alone "
                         "does not leave room")
        else:
            lines += [f"  context parallelism (planned; panda does not implement it): CP {ls.cp} -> "
                      f"{ls.cp_positions_per_gpu:,} positions per GPU, {ls.cp_peak_gib:,.1f} GiB per GPU (micro-batch 1)",
                      f"    mesh: {ls.mesh}" + (f"; the CP ring spans {ls.cp_nodes} nodes" if ls.cp_nodes and ls.cp_nodes > 1 else ""),
                      "    K/V exchange per layer per GPU: " + ", ".join(f"{k} {v:,.2f} GiB" for k, v in ls.kv_exchange_gib.items())
                      + f" (x {ls.layers} layers a step)"]
            if ls.kv_forward_ms is not None and ls.attention_forward_ms is not None:
                hidden = "hidden behind it" if ls.kv_forward_ms < ls.attention_forward_ms else "NOT hidden: the link is the bottleneck"
                lines.append(f"    forward per layer: {ls.kv_forward_ms:,.0f} ms of K/V exchange at {ls.kv_link_gbs:g} GB/s vs "
                             f"{ls.attention_forward_ms:,.0f} ms of causal attention at {p.mfu:.0%} MFU ({hidden})")
            lines.append("    panda would need: a CP mesh dimension beside FSDP2's, position ids (RoPE) sharded along the "
                         "sequence, the splice making each GPU's share, load-balanced causal shards, the loss summed over "
                         "CP ranks (docs/train-and-scale.md, \"Long videos\")")
    lines += [f"  note: {n}" for n in ls.notes]
    return lines


PLAN_KEYS = ("gpu", "mfu", "llm_preset", "samples", "text_tokens", "supervised_tokens")


def main(argv=None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from panda import check_torchvision
    from panda.config import register_configs, to_train_config
    from panda.runs import exit_on_config_error

    check_torchvision()  # the plan imports Lightning (panda.training.trainer): explain a broken torchvision first

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
        return 0
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    try:
        from hydra import compose, initialize_config_dir

        from panda.config import TrainConfig
        from panda.overrides import check_overrides, hydra_overrides, searchpath_override
        from panda.paths import config_dir

        argv, user_dir = hydra_overrides(argv)  # --config-dir DIR: a config folder of the user's, as train takes it
        opts = {k.split("=", 1)[0]: k.split("=", 1)[1] for k in argv if k.split("=", 1)[0] in PLAN_KEYS}
        overrides = [a for a in argv if a.split("=", 1)[0] not in PLAN_KEYS]
        extra_dirs = [user_dir] if user_dir else []
        register_configs()
        check_overrides(overrides, TrainConfig, extra_dirs=extra_dirs)  # a misspelt experiment must not plan the default model
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra.searchpath")]
        overrides += searchpath_override(argv, extra_dirs)
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = to_train_config(compose(config_name="train", overrides=overrides))
        result = plan(cfg, opts.get("gpu", "h100_80g"), float(opts.get("mfu", 0.4)), opts.get("llm_preset"),
                      int(opts["samples"]) if "samples" in opts else None,
                      int(opts["text_tokens"]) if "text_tokens" in opts else None,
                      supervised_tokens=int(opts["supervised_tokens"]) if "supervised_tokens" in opts else None)
    except (*UNPLANNABLE, HydraException, OmegaConfBaseException) as exc:  # cannot be composed or planned: one line, exit 2
        exit_on_config_error("panda.plan", exc)
    print(json.dumps(dataclasses.asdict(result), indent=2) if as_json else render(result))
    return 0 if result.fits in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
