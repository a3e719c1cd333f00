"""Structured (dataclass) schemas of every Hydra config group.

``conf/train.yaml`` composes on top of :class:`TrainConfig` (registered as ``panda_train``), so a
misspelt key or a wrong type fails at composition with Hydra's message naming the key. Semantic
checks (divisibility, known names) live in :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from panda.evaluation.benchmarks import BenchmarkConfig
from panda.evaluation.judge import JudgeConfig
from panda.models.distill import DISTILL_LOSSES, DistillConfig
from panda.models.stab import STABConfig
from panda.models.teachers import TEACHER_KINDS, TeacherConfig
from panda.training.fsdp import FSDPConfig


@dataclass
class LLMConfig:
    """Any Hugging Face causal LM: a local folder (``pretrained``) or a LLaMA built from sizes."""

    pretrained: Optional[str] = None  # local HF folder; None builds a random LLaMA from the sizes below
    tokenizer: Optional[str] = None  # local tokenizer folder; None: the dataset's (synthetic) or ``pretrained``
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: Optional[int] = None
    intermediate_size: int = 128
    initializer_range: float = 0.02  # std of the random init (built LLMs only)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (GPU, needs the [gpu] extra)
    dtype: str = "float32"


@dataclass
class ModelConfig:
    projector: str = "mlp2x_gelu"
    template: str = "vicuna_v1"  # conversation template for training
    eval_template: str = "vicuna_v1_eval"  # the release evaluated with the "curious human" variant
    max_length: int = 4096  # tokens after visual expansion
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing of the LLM's decoder layers


@dataclass
class SyntheticDataConfig:
    train_videos: int = 800
    eval_videos: int = 120
    num_frames: int = 16
    fps: int = 8
    seed: int = 0
    vocab_size: int = 400
    kinds: list[str] = field(default_factory=lambda: ["colour", "direction"])  # add "shape" for a harder task
    multi_turn_fraction: float = 0.2
    phrasings: int = 3


@dataclass
class ShardSourceConfig:
    """One prepared shard folder (``python -m panda.data.prepare --output``), local or an object-store URL."""

    name: str = MISSING
    path: str = MISSING
    weight: Optional[float] = None  # share of each epoch's samples; None on every source = all samples once


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str = MISSING  # DATA_ROOT; other paths below are relative to it (each data config sets or requires it)
    synthetic: Optional[SyntheticDataConfig] = None  # set: generate the demo dataset under ``root``
    train_records: list[str] = field(default_factory=lambda: ["train/train_json/synthetic_train.json"])
    video_root: str = "train"
    eval_qa: Optional[str] = "eval/Synthetic_Zero_Shot_QA"  # folder with test_q.json, test_a.json, videos/
    eval_limit: Optional[int] = None  # evaluate on the first N questions only
    batch_size: int = 16
    eval_batch_size: int = 64
    num_workers: int = 2
    sample_fps: float = 1.0
    video_backend: str = "auto"  # auto (decord, then PyAV) | decord | pyav
    on_bad_record: str = "skip"  # skip (count + list in rejects) | raise
    fraction: float = 1.0  # train on a seeded random fraction of the records (stage 1: half of Valley)
    fraction_seed: int = 0
    # streaming: set -> train on prepared litdata shards instead of train_records + video_root
    shards: list[ShardSourceConfig] = field(default_factory=list)
    cache_dir: Optional[str] = None  # local cache of remote chunks (default ~/.cache/panda/shards)
    samples_per_epoch: Optional[int] = None  # with weighted sources: samples per epoch (default: all of them)
    shuffle_window: int = 4096  # samples shuffled together after the chunk order is shuffled
    group_by_length: bool = True  # batches of similar text length (less padding)
    group_batches: int = 32  # ... sorted within groups of this many batches


@dataclass
class StageConfig:
    """A training stage: what trains and how fast (training.md §3)."""

    name: str = "scratch"
    train_stab: bool = True
    train_projector: bool = True
    train_llm: bool = True
    lr: float = 4e-5  # LLM learning rate
    vision_lr: Optional[float] = None  # STAB + projector; None = ``lr``
    weight_decay: float = 0.0  # never applied to norms, biases and embeddings-like 1-D parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (FSDP2 via ModelParallelStrategy; settings in trainer.fsdp)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    precision: str = "32-true"
    max_epochs: int = 1
    max_steps: int = -1
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    # the one batch knob of a recipe: accumulation = global / (data.batch_size × devices × num_nodes)
    global_batch_size: Optional[int] = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 200
    limit_train_batches: Optional[Any] = None
    fast_dev_run: Any = False
    overfit_batches: Any = 0.0
    deterministic: bool = False
    enable_progress_bar: bool = True
    cpu_threads: Optional[int] = None  # torch intra-op threads in the training process; None = torch's default


@dataclass
class LoggerConfig:
    kind: str = "csv"  # csv | wandb | none
    project: str = "panda"
    group: Optional[str] = None
    offline: Optional[bool] = None  # wandb: None = offline unless an API key is configured
    tags: list[str] = field(default_factory=list)


INIT_KINDS = ("none", "eve", "release", "checkpoint")


@dataclass
class InitConfig:
    """Where the weights of a run start from (training.md §3).

    ``eve``: an EVE-7B-Pretrain folder — its LLM, plus the STAB parts it shares (patch, frame-query
    and row embeddings, LSD, FSRA), the projector and the distillation head; the rest of STAB is
    fresh. ``release``: a Video-Panda release folder or a folder exported by panda (a previous
    stage). ``checkpoint``: a panda Lightning ``.ckpt`` (weights only; use ``ckpt_path`` to resume).
    With ``eve``/``release`` the LLM's architecture comes from the folder, not from ``llm.*`` sizes.
    """

    kind: str = "none"  # none | eve | release | checkpoint
    path: Optional[str] = None


@dataclass
class TrainConfig:
    frames: int = 4  # frames per video: data, STAB and prompts all read this one key
    seed: int = 42
    name: str = "default"
    stab: STABConfig = field(default_factory=STABConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    init: InitConfig = field(default_factory=InitConfig)
    runs_root: str = "outputs"  # run dirs live under it; recipe stages find each other's output here
    export_final: bool = False  # write run_dir/final: a release-format folder the next stage can start from
    ckpt_path: Optional[str] = None  # resume: a .ckpt path, or "last" (this run dir's last checkpoint)
    resume: str = "none"  # auto: continue from the newest complete checkpoint of this run (same name)
    evaluate: bool = True  # held-out QA after training
    max_new_tokens: int = 16


@dataclass
class EvaluateConfig:
    """``evaluate.py``: benchmarks (a dict, composed from ``conf/benchmark``), judge, decoding."""

    checkpoint: str = MISSING  # a train.py .ckpt, a panda export folder, or a Video-Panda release folder
    benchmark: Dict[str, BenchmarkConfig] = field(default_factory=dict)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(kind="none"))
    name: str = "evaluate"
    frames: Optional[int] = None  # None: the checkpoint's (8 for the release)
    batch_size: int = 8
    max_new_tokens: int = 1024  # the release's limit; generation stops at </s>
    num_workers: int = 2
    sample_fps: float = 1.0
    device: str = "auto"  # auto: cuda:LOCAL_RANK when there is a GPU, else cpu
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    samples: int = 16  # rows per benchmark in the wandb samples table


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="panda_train", node=TrainConfig)
    cs.store(name="panda_evaluate", node=EvaluateConfig)


def validate(cfg) -> None:
    """Checks that need more than types; raise ``ValueError`` naming the key and the fix."""
    stab = STABConfig(**cfg.stab) if not isinstance(cfg.stab, STABConfig) else cfg.stab
    stab.validate()
    if cfg.frames < 1:
        raise ValueError(f"frames={cfg.frames} must be >= 1")
    if cfg.frames % stab.chunk_size:
        raise ValueError(
            f"frames={cfg.frames} must be a multiple of stab.chunk_size={stab.chunk_size} "
            f"(set stab.chunk_size to a divisor of frames, e.g. stab.chunk_size={cfg.frames})"
        )
    if cfg.logger.kind not in ("csv", "wandb", "none"):
        raise ValueError(f"logger.kind={cfg.logger.kind!r}: use csv, wandb or none")
    if cfg.stage.schedule not in ("cosine", "constant"):
        raise ValueError(f"stage.schedule={cfg.stage.schedule!r}: use cosine or constant")
    if cfg.data.on_bad_record not in ("skip", "raise"):
        raise ValueError(f"data.on_bad_record={cfg.data.on_bad_record!r}: use skip or raise")
    if cfg.teacher.kind not in TEACHER_KINDS:
        raise ValueError(f"teacher.kind={cfg.teacher.kind!r}: use one of {TEACHER_KINDS} (or pick a file in conf/teacher)")
    if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg.data, "root"):
        raise ValueError(f"data={cfg.data.name} needs data.root=/path/to/DATA_ROOT (the folder that holds train/ and eval/)")
    if cfg.teacher.kind == "languagebind_video" and not cfg.teacher.path and not cfg.teacher.random_init:
        raise ValueError(
            "teacher=languagebind_video needs teacher.path=/path/to/LanguageBind_Video_merge "
            "(teacher.random_init=true builds an untrained toy teacher instead)"
        )
    if cfg.teacher.kind == "hf_vision" and not cfg.teacher.path:
        raise ValueError("teacher=hf_vision needs teacher.path=/path/to/a/local/vision/model")
    if cfg.distill.loss not in DISTILL_LOSSES:
        raise ValueError(f"distill.loss={cfg.distill.loss!r}: use one of {DISTILL_LOSSES}")
    if cfg.init.kind not in INIT_KINDS:
        raise ValueError(f"init.kind={cfg.init.kind!r}: use one of {INIT_KINDS}")
    if cfg.init.kind != "none" and not cfg.init.path:
        raise ValueError(f"init.kind={cfg.init.kind} needs init.path (a folder or .ckpt to start from)")
    if cfg.trainer.strategy == "fsdp" and cfg.trainer.fsdp.cpu_offload:
        import torch

        if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available():
            raise ValueError("trainer.fsdp.cpu_offload keeps GPU shards in host memory: it needs a CUDA GPU "
                             "(on a CPU-only run everything already lives in host memory; drop the option)")
    if cfg.data.shards:
        if cfg.data.synthetic is not None:
            raise ValueError("data.shards and data.synthetic are exclusive: set data.synthetic=null to train on shards")
        weights = [s.weight for s in cfg.data.shards]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise ValueError(f"data.shards: give every source a weight or none, got {weights}")
        if any(w is not None and w <= 0 for w in weights):
            raise ValueError(f"data.shards: weights must be > 0, got {weights}")
    if not 0.0 < cfg.data.fraction <= 1.0:
        raise ValueError(f"data.fraction={cfg.data.fraction} must be in (0, 1]")
    if not (cfg.stage.train_stab or cfg.stage.train_projector or cfg.stage.train_llm):
        raise ValueError(f"stage {cfg.stage.name!r} trains nothing: set one of stage.train_* to true")
