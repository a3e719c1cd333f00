"""Structured (dataclass) schemas of every Hydra config group, and the checks types cannot express.

``conf/train.yaml`` composes on top of :class:`TrainConfig` (registered as ``panda_train``), so a
misspelt key, a wrong type or an unknown choice (an :class:`enum.Enum` field) fails at composition
with Hydra's message naming the key. :func:`to_train_config` turns the composed ``DictConfig``
into these dataclasses (``OmegaConf.to_object``) and runs :func:`validate`, the semantic checks
(divisibility, required paths). Code below the entry points receives the dataclass objects and
never mutates them: values a run derives (gradient accumulation, the teacher's sizes, the LLM
architecture read from a folder, the run's tokenizer copy) live in :class:`Derived`.

Each default is defined once, here (or in the model-side dataclass a field points to); the YAML
files in ``conf/`` set only what a choice changes.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from panda.choices import Choice
from panda.data.budget import Sampling, SamplingConfig
from panda.data.conversation import Tokenization
from panda.data.records import OnBadRecord
from panda.data.synthetic import SyntheticConfig
from panda.data.video import VideoBackend
from panda.models.distill import DistillConfig
from panda.models.stab import PROJECTORS, STABConfig
from panda.models.teachers import TeacherConfig, check_teacher_config
from panda.registry import import_plugins

# Each choice is one Choice (panda/choices.py), owned by the layer that acts on it: Tokenization,
# Sampling, VideoBackend and OnBadRecord by the data layer, DistillLoss by the model layer;
# the choices below are the run's own.


class Schedule(Choice):
    cosine = "cosine"  # warmup, then cosine decay to stage.min_lr_ratio of the peak
    constant = "constant"  # warmup, then the peak learning rate to the end


class Strategy(Choice):
    auto = "auto"  # one process
    ddp = "ddp"  # data parallel: every rank holds the whole model
    fsdp = "fsdp"  # FSDP2 via ModelParallelStrategy (trainer.fsdp.*)


class Adapter(Choice):
    """What trains in the LLM when its stage trains it (panda/models/adapters.py)."""

    none = "none"  # every LLM weight (the release)
    lora = "lora"  # low-rank adapters on the target modules; the LLM's own weights stay frozen
    qlora = "qlora"  # lora on a 4-bit (NF4) LLM: needs a CUDA GPU and bitsandbytes


class InitKind(Choice):
    none = "none"  # random init (an llm.pretrained folder still brings its LLM weights)
    eve = "eve"  # an EVE-7B-Pretrain folder: its LLM and the STAB parts it shares
    release = "release"  # a Video-Panda release folder or a panda export
    checkpoint = "checkpoint"  # a train.py .ckpt, weights only


FOLDER_INITS = (InitKind.eve, InitKind.release)  # inits whose folder also holds the LLM (and its tokenizer)


@dataclass
class FSDPConfig:
    """``trainer.fsdp``: how ``trainer=fsdp`` shards (panda/training/fsdp.py)."""

    param_dtype: Optional[str] = "bfloat16"  # compute dtype of the unsharded parameters; None = as stored
    reduce_dtype: Optional[str] = "float32"  # gradient reduce-scatter dtype
    cpu_offload: bool = False  # keep parameter shards in host memory between uses (needs a CUDA GPU)
    activation_checkpointing: bool = True  # non-reentrant, per decoder layer
    hybrid_shard: bool = False  # shard inside a node, replicate across trainer.num_nodes
    distributed_checkpoint: bool = True  # sharded checkpoints (no full gather on rank 0)
    # only rank 0 builds the model and reads its initial weights (init.path, llm.pretrained); the other ranks
    # build it on the meta device and receive their shards from rank 0 after sharding. false: every rank
    # builds the whole model and reads the weights itself (host memory: a full copy per rank)
    broadcast_from_rank0: bool = True


@dataclass
class JudgeConfig:
    kind: str = "exact_match"  # a registered judge (panda.evaluation.judge.JUDGES): exact_match (offline) | openai
    # the exact model id, recorded in the results and the judge fingerprint. The paper's gpt-3.5-turbo
    # was shut down on 2026-10-23: the default is a dated snapshot (conf/judge/ has the presets)
    model: str = "gpt-4.1-mini-2025-04-14"
    revision: Optional[str] = None  # an open-weights judge's Hub revision (commit) the server was started with
    base_url: Optional[str] = None  # None = the OpenAI API; e.g. http://127.0.0.1:8000/v1 for a local server
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable, never from config
    temperature: float = 0.0  # sampling temperature of the judge (0: its most likely reply)
    seed: Optional[int] = 0  # sent with every request (servers that honour it sample reproducibly)
    # send a JSON schema as the OpenAI-standard response_format (vLLM, SGLang and llama.cpp servers honour it
    # too): the reply is constrained to {"pred": "yes"|"no", "score": 0..5} and cannot be unparseable
    structured_output: bool = True
    max_tokens: int = 64  # longest judge reply, in tokens
    timeout_s: float = 30.0  # per request; a timeout is retried
    max_retries: int = 6  # retries of a request after a timeout, 429 or 5xx
    backoff_s: float = 1.0  # first retry waits up to this long; doubles each time (full jitter)
    backoff_max_s: float = 30.0  # the longest wait between retries
    concurrency: int = 8  # requests in flight at once
    cache: Optional[str] = "~/.cache/panda/judge_cache.sqlite"  # None: no cache
    prompt_file: Optional[str] = None  # JSON {"version": ..., "prompts": {task: {system, user}}}
    extra: dict = field(default_factory=dict)  # extra request fields (e.g. seed)


@dataclass
class BenchmarkConfig:
    name: str = "synthetic"  # the benchmark's name in results and messages (the key it is chosen under)
    kind: str = "qa"  # a registered benchmark kind (panda/evaluation/benchmarks.py): qa | vcgbench | mcq
    root: Optional[str] = None  # the evaluation DATA_ROOT; paths below are relative to it
    from_checkpoint: bool = False  # qa: use the data root and held-out split stored in a train.py checkpoint
    qa_dir: Optional[str] = None  # qa: folder with test_q.json, test_a.json, videos/
    generic: Optional[str] = None  # vcgbench: generic questions (judged for correctness, detail and context)
    temporal: Optional[str] = None  # vcgbench: temporal questions
    consistency: Optional[str] = None  # vcgbench: consistency questions (pairs of phrasings)
    video_dir: Optional[str] = None  # vcgbench: the videos
    judge: Optional[str] = None  # None: the run's judge; a registered judge kind (exact_match: the offline one)
    limit: Optional[int] = None  # first N questions only
    # mcq (multiple choice: EgoSchema, Video-MME): the release layout, its question/answer files
    layout: Optional[str] = None  # egoschema | videomme
    questions: Optional[str] = None  # egoschema: questions.json; videomme: test-*.parquet (or .json / .jsonl)
    answers: Optional[str] = None  # egoschema: subset_answers.json (only questions with an answer are scored)
    # mcq: an answer the parser cannot read is decided by the option letter the model ranks highest at the
    # answer's first position; false: it chose no option and counts as wrong (a tokenizer without distinct letters)
    loglikelihood: bool = True


@dataclass
class LoRAConfig:
    """``llm.lora``: the adapters of ``llm.adapter=lora|qlora`` (peft's ``LoraConfig``)."""

    rank: int = 16  # r: the adapters' inner width
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # dropout on each adapter's input
    # attention and MLP projections of LLaMA, Qwen, Mistral (and most HF decoders); names are matched
    # against the end of each linear layer's name inside the LLM
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class LLMConfig:
    """Any Hugging Face causal LM: a local folder (``pretrained``) or a LLaMA built from sizes."""

    pretrained: Optional[str] = None  # local HF folder; None builds a random LLaMA from the sizes below
    tokenizer: Optional[str] = None  # local tokenizer folder; None: the dataset's (synthetic) or ``pretrained``
    hidden_size: int = 64  # built LLMs only (the sizes below too)
    layers: int = 2  # decoder layers
    heads: int = 4  # attention heads
    kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None = heads
    intermediate_size: int = 256  # MLP hidden width
    initializer_range: float = 0.02  # std of the random init (built LLMs only)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (GPU, needs the [gpu] extra)
    dtype: str = "float32"  # dtype the LLM's parameters are stored in (bfloat16: a frozen LLM in stage 1)
    adapter: Adapter = Adapter.none  # lora | qlora: train adapters instead of the LLM's weights (stages that train the LLM)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ModelConfig:
    projector: str = "mlp2x_gelu"  # a registered projector (PROJECTORS): linear | mlp2x_gelu (the release) | mlp3x_gelu
    template: str = "vicuna_v1"  # conversation format for training: vicuna_v1, or chat (the tokenizer's chat_template)
    eval_template: str = "vicuna_v1_eval"  # the release evaluated with the "curious human" variant
    tokenization: Tokenization = Tokenization.release  # release: exactly the released model's ids and labels
    # release: text positions, each frame counting as one (the release's cut); the LLM then sees up to
    # max_length + frames x (visual tokens per frame - 1). spans: positions after visual expansion.
    max_length: int = 4096
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing of the LLM's decoder layers
    # torch.compile of STAB's parts and the projector (dynamic shapes: no recompile per batch size or
    # aspect-ratio mix; panda/models/compiled.py); compile_llm_layers adds each LLM decoder layer
    compile: bool = False
    compile_backend: str = "inductor"  # inductor (needs a C++ compiler on CPU), aot_eager, eager, ...
    compile_llm_layers: bool = False  # with compile: also each LLM decoder layer


@dataclass
class ShardSourceConfig:
    """One prepared shard folder (``python -m panda.data.prepare --output``), local or an object-store URL."""

    name: str = MISSING  # the source's name in logs and messages
    path: str = MISSING  # the folder or URL (s3://, gs://, ...) prepare wrote
    weight: Optional[float] = None  # share of each epoch's samples; None on every source = all samples once


@dataclass
class MixtureSourceConfig:
    """One source of a training mixture (``data.sources``): a prepared shard folder or a records file
    with its videos, its share of the batches, an optional cap and, where it differs, its own frame
    sampling (docs/data.md, "Mixtures")."""

    name: str = MISSING  # the source's name in logs (data/source_share/NAME) and messages: letters, digits, _ . + -
    # a folder prepared by `panda prepare` or an object-store URL (s3://, gs://, ...), or a records file (a path ending
    # in .json: a list in the Valley / Video-ChatGPT format); relative to data.root unless absolute
    path: str = MISSING
    video_root: Optional[str] = None  # a records file's videos: the folder its video paths are relative to (relative to data.root); None: data.video_root
    weight: Optional[float] = None  # share of each epoch's samples, round(N x weight / sum of weights); None on every source = all samples once
    cap: Optional[int] = None  # at most this many samples of this source per epoch (a fresh seeded draw each epoch); None: no cap
    frames: Optional[int] = None  # frames per video of this source (release sampling; a multiple of stab.chunk_size); None: the run's frames
    sampling: Optional[Sampling] = None  # this source's data.sampling (release | fps | budget); None: the run's
    sample_fps: Optional[float] = None  # this source's data.sample_fps; None: the run's
    max_frames: Optional[int] = None  # this source's data.max_frames (fps / budget); None: the run's
    max_visual_tokens: Optional[int] = None  # this source's data.max_visual_tokens (budget); None: the run's


@dataclass
class DataConfig(SamplingConfig):
    """``data``: what trains and how it is read. The frame sampling keys (``data.sampling``,
    ``data.sample_fps``, ``data.max_frames``, ``data.max_visual_tokens``) are
    :class:`panda.data.budget.SamplingConfig`'s."""

    name: str = "synthetic"  # the dataset's name (messages; panda.plan reads its sample count from it)
    root: str = MISSING  # DATA_ROOT; other paths below are relative to it (each data config sets or requires it)
    synthetic: Optional[SyntheticConfig] = None  # set: generate the demo dataset under ``root``
    # record files (JSON lists in the Valley / Video-ChatGPT format), relative to root
    train_records: list[str] = field(default_factory=lambda: ["train/train_json/synthetic_train.json"])
    video_root: str = "train"  # the folder the records' video paths are relative to (relative to root)
    eval_qa: Optional[str] = "eval/Synthetic_Zero_Shot_QA"  # folder with test_q.json, test_a.json, videos/
    eval_limit: Optional[int] = None  # evaluate on the first N questions only
    batch_size: int = 16  # samples per micro-batch and process
    eval_batch_size: int = 64  # questions per generation batch of the held-out evaluation
    num_workers: Optional[int] = None  # loader workers per process; None: cores per process - 1 (at most 8)
    video_backend: VideoBackend = VideoBackend.auto
    # pack each micro-batch's samples (text + visual tokens) into fewer rows, no attention between them
    # (panda/models/packing.py): same loss, less padding. pack_length: positions per row (None: the
    # micro-batch's longest sample, so no row is wider than unpacked; larger pays off with flash-attn)
    packing: bool = False
    pack_length: Optional[int] = None  # positions per packed row (see packing)
    on_bad_record: OnBadRecord = OnBadRecord.skip  # skip (count + list in rejects) | raise
    # training stops (exit 2, naming the reasons and the key to fix) when more than this share of the samples
    # read so far in an epoch were skipped (missing or undecodable videos, over-long conversations), checked on
    # every logging step and at each epoch's end; an epoch with every sample skipped always stops, even at 1.0
    max_skipped_fraction: float = 0.5
    fraction: float = 1.0  # train on a seeded random fraction of the records (stage 1: half of Valley)
    fraction_seed: int = 0  # seed of the subset fraction picks
    # streaming: set -> train on prepared litdata shards instead of train_records + video_root (a mixture of shard
    # folders only, each path as given; data.sources also takes records files, caps and per-source frame sampling)
    shards: list[ShardSourceConfig] = field(default_factory=list)
    # a mixture of prepared shard folders and records files, each with its weight, cap and frame sampling
    # (docs/data.md, "Mixtures"); set -> data.shards must be empty and data.train_records [] (data=mixture)
    sources: list[MixtureSourceConfig] = field(default_factory=list)
    cache_dir: Optional[str] = None  # local cache of remote chunks (default ~/.cache/panda/shards)
    samples_per_epoch: Optional[int] = None  # with weighted sources: samples per epoch (default: all of them)
    shuffle_window: int = 4096  # samples shuffled together after the chunk order is shuffled
    group_by_length: bool = True  # batches of similar text length (less padding)
    group_batches: int = 32  # ... sorted within groups of this many batches


@dataclass
class StageConfig:
    """A training stage: what trains and how fast (docs/recipe-reference.md, "Training stages")."""

    name: str = "scratch"  # the stage's name in logs and the run summary
    train_stab: bool = True  # false: STAB is frozen
    train_projector: bool = True  # false: the projector is frozen
    train_llm: bool = True  # false: the LLM is frozen (stage 1)
    lr: float = 4e-5  # LLM learning rate
    vision_lr: Optional[float] = None  # STAB + projector; None = ``lr``
    weight_decay: float = 0.0  # never applied to norms, biases and embeddings-like 1-D parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's
    warmup_ratio: float = 0.03  # linear warmup over this share of the optimiser steps
    schedule: Schedule = Schedule.cosine
    min_lr_ratio: float = 0.0  # cosine: the learning rate decays to this share of its peak


@dataclass
class TrainerConfig:
    # perf/mfu's denominator, dense TFLOP/s per device; None: from the GPU's name (A100, H100, H200, ...),
    # on CPU this machine's measured fp32 matmul rate
    peak_tflops: Optional[float] = None
    # on a CUDA machine, plan the run (python -m panda.plan) against the GPU's free memory before building
    # the model, and stop with the planner's fix when it cannot fit; false skips the check
    plan_check: bool = True
    accelerator: str = "cpu"  # Lightning's: cpu | gpu | auto
    devices: Any = 1  # processes (devices) per node: a number or auto
    num_nodes: int = 1  # machines
    strategy: Strategy = Strategy.auto  # fsdp: FSDP2 via ModelParallelStrategy, settings in trainer.fsdp
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    precision: str = "32-true"  # Lightning's: 32-true | bf16-mixed | ...
    max_epochs: int = 1  # the data config sets the synthetic default's (20)
    max_steps: int = -1  # optimiser steps; -1: no limit (max_epochs decides)
    gradient_clip_val: Optional[float] = 1.0  # clip the gradient norm to this; None: no clipping
    # an optimiser step whose loss or gradient norm is NaN/inf is skipped on every rank (counted as
    # train/nonfinite_steps, its samples named in a warning); this many in a row stop the run with a
    # checkpoint of the last finite weights (docs/train-and-scale.md, "Non-finite steps"); 0: no guard
    max_nonfinite_steps: int = 3
    accumulate_grad_batches: int = 1  # ignored when global_batch_size is set (accumulation is derived)
    # the one batch knob of a recipe: accumulation = global / (data.batch_size × devices × num_nodes)
    global_batch_size: Optional[int] = None
    log_every_n_steps: int = 10  # metrics (csv/metrics.csv, wandb) every N optimiser steps
    checkpoint_every_n_steps: int = 200  # conf/train.yaml sets 500 for every run
    limit_train_batches: Optional[Any] = None  # Lightning's: batches per epoch (int) or share (float)
    fast_dev_run: Any = False  # Lightning's: run N batches, no checkpoint (debug=fast_dev_run)
    overfit_batches: Any = 0.0  # Lightning's: train on these batches only (debug=overfit)
    deterministic: bool = False  # Lightning's: deterministic algorithms only
    enable_progress_bar: bool = True  # the progress bar on the terminal
    cpu_threads: Optional[int] = None  # torch intra-op threads in the training process; None = torch's default
    # count the device->host synchronisations of every micro-batch by panda source line (panda/training/syncs.py):
    # syncs.json in the run directory, a table in the log; slows the step, for audits only
    audit_syncs: bool = False


@dataclass
class LoggerConfig:
    kind: str = "csv"  # a registered logger (panda.training.trainer.LOGGERS): csv | wandb | none
    project: str = "panda"  # wandb project
    group: Optional[str] = None  # wandb group (one per study)
    offline: Optional[bool] = None  # wandb: None = offline unless an API key is configured
    tags: list[str] = field(default_factory=list)  # wandb tags
    # every N optimiser steps, with a held-out split (data.eval_qa): val/loss on its first val_loss_items
    # questions, and greedy answers to the first table_items in samples/ (and a wandb table); 0: off
    val_every_n_steps: int = 200
    val_loss_items: int = 16  # held-out questions in val/loss
    table_items: int = 4  # held-out questions answered in samples/


@dataclass
class InitConfig:
    """Where the weights of a run start from (docs/recipe-reference.md, "Training stages").

    ``eve``: an EVE-7B-Pretrain folder — its LLM, plus the STAB parts it shares (patch, frame-query
    and row embeddings, LSD, FSRA), the projector and the distillation head; the rest of STAB is
    fresh. ``release``: a Video-Panda release folder or a folder exported by panda (a previous
    stage). ``checkpoint``: a panda Lightning ``.ckpt`` (weights only; ``resume=PATH`` resumes a run).
    With ``eve``/``release`` the LLM's architecture comes from the folder, not from ``llm.*`` sizes.
    """

    kind: InitKind = InitKind.none  # none: random init (or llm.pretrained)
    path: Optional[str] = None  # the folder (eve, release) or .ckpt (checkpoint)


@dataclass
class TrainConfig:
    frames: int = 4  # frames per video: data, STAB and prompts all read this one key
    seed: int = 42  # seeds everything (Lightning seed_everything, loader workers too)
    name: str = "default"  # the run's name: run dirs are runs_root/name/<date>; resume=auto looks for it
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
    # the folder under runs_root where the 7B recipe's stages write and find each other (a variant=
    # of a paper table sets its own, so its stages chain among themselves)
    recipe: str = "videopanda_7b"
    export_final: bool = False  # write run_dir/final: a release-format folder the next stage can start from
    # continue a run (model, optimiser, scheduler, step, data position): none | last (this run dir's last
    # checkpoint) | auto (the newest complete checkpoint of this run's name under runs_root) | PATH (a .ckpt)
    resume: str = "none"
    evaluate: bool = True  # held-out QA after training
    max_new_tokens: int = 16  # answer length limit of the held-out evaluation
    run_dir: Optional[str] = None  # outside Hydra (called from Python): where the run writes; under Hydra, hydra.run.dir
    # your own modules, imported before the config is checked: their @REGISTRY.register(...) parts (a projector,
    # teacher, judge, logger, benchmark kind) become names the config can use (panda/registry.py)
    plugins: list[str] = field(default_factory=list)


@dataclass
class EvaluateConfig(SamplingConfig):
    """``evaluate.py``: benchmarks (a dict, composed from ``conf/benchmark``), judge, decoding; frame
    sampling (``sampling``, ``sample_fps``, ``max_frames``, ``max_visual_tokens``) as ``data.*``'s."""

    checkpoint: str = MISSING  # a train.py .ckpt, a panda export folder, or a Video-Panda release folder
    benchmark: Dict[str, BenchmarkConfig] = field(default_factory=dict)  # name -> benchmark (benchmark=[a,b])
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(kind="none"))
    name: str = "evaluate"  # the run's name (wandb)
    frames: Optional[int] = None  # None: the checkpoint's (8 for the release)
    batch_size: int = 8  # questions per generation batch
    max_new_tokens: int = 1024  # the release's limit; generation stops at </s>
    num_workers: Optional[int] = None  # None: cores per process - 1 (at most 8)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when there is a GPU, else cpu
    dtype: str = "float32"  # the dtype the model generates in
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    samples: int = 16  # rows per benchmark in the wandb samples table
    run_dir: Optional[str] = None  # outside Hydra: where results go; under Hydra, hydra.run.dir
    plugins: list[str] = field(default_factory=list)  # your own modules with registered parts (as in train.py)


@dataclass(frozen=True)
class Derived:
    """What a run derives from its config and the files it reads, kept apart from the user's config
    (which is never written to). Stored beside the config in every checkpoint, so evaluation,
    export and chat rebuild exactly the model that trained.

    - ``accumulate_grad_batches``: from ``trainer.global_batch_size`` (or as configured);
    - ``teacher_width`` / ``teacher_image_size`` / ``teacher_patch_size``: of the teacher actually
      loaded (a folder's config.json wins over ``teacher.*`` sizes); None without distillation;
    - ``llm_config``: the Hugging Face config of an LLM that came from a folder (``init``), to
      rebuild the architecture without the folder;
    - ``tokenizer``: the run's own copy of its tokenizer.
    """

    accumulate_grad_batches: int = 1
    teacher_width: Optional[int] = None
    teacher_image_size: Optional[int] = None
    teacher_patch_size: Optional[int] = None
    llm_config: Optional[dict] = None
    tokenizer: Optional[str] = None


REQUIRED_HINTS = {
    "llm.pretrained": "a local Hugging Face folder of the LLM (config.json, weights, tokenizer files)",
}


class RequiredValue(ValueError):
    """A ``${required:KEY}`` value that was not given."""


def _required(key: str) -> None:
    """``${required:KEY}`` in a config file: a value the user must give (``???`` cannot say so on a
    key whose schema default is None, since merging ``???`` keeps the default)."""
    choice = ""
    try:
        from hydra.core.hydra_config import HydraConfig

        group = key.split(".")[0]
        option = HydraConfig.get().runtime.choices.get(group)
        choice = f"{group}={option} " if option else ""
    except ValueError:
        pass
    raise RequiredValue(f"{choice}needs {key}=PATH: {REQUIRED_HINTS.get(key, 'set it on the command line')}")


def register_configs() -> None:
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required)
    cs = ConfigStore.instance()
    cs.store(name="panda_train", node=TrainConfig)
    cs.store(name="panda_evaluate", node=EvaluateConfig)


def to_train_config(cfg: DictConfig | dict | TrainConfig) -> TrainConfig:
    """The typed, validated run config: a composed ``DictConfig``, a plain dict (a checkpoint's
    copy) or a ``TrainConfig``."""
    if not isinstance(cfg, TrainConfig):
        if not OmegaConf.is_config(cfg):
            cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        check_known_keys(cfg)
        if OmegaConf.is_missing(cfg.data, "root"):
            if len(cfg.data.sources):
                raise ValueError(f"data={cfg.data.name} needs data.root=FOLDER: the folder the data.sources paths that are "
                                 "not absolute (and their video_root) are relative to")
            if len(cfg.data.shards):
                raise ValueError(f"data={cfg.data.name} needs data.root=/path/to/prepared/shards: the --output folder of "
                                 "`python -m panda.data.prepare` (or an object-store URL such as s3://bucket/shards)")
            raise ValueError(f"data={cfg.data.name} needs data.root=/path/to/DATA_ROOT: the folder the record files "
                             "(data.train_records) and videos (data.video_root) are relative to")
        try:
            cfg = OmegaConf.to_object(cfg)
        except InterpolationResolutionError as exc:  # a ${required:KEY} left unset: its own message, not OmegaConf's
            cause = exc
            while cause is not None and not isinstance(cause, RequiredValue):
                cause = cause.__cause__ or cause.__context__
            raise (cause or ValueError(str(exc))) from None
    import_plugins(cfg.plugins)  # their registered parts are names the checks below accept
    validate(cfg)
    return cfg


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys of ``node`` that its dataclass schema lacks (Hydra lets ``+key=value`` add them), each
    with the closest known key when there is one."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []  # a free-form dict (e.g. evaluate.py's benchmark map, judge.extra)
    names = [f.name for f in dataclasses.fields(schema)]
    found = []
    for key in node.keys():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            found.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue  # nothing to look into (an interpolation's target is checked where it stands)
        child = node[key]  # neither missing nor an interpolation: read as it is, None for a None node
        if isinstance(child, DictConfig):
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def unknown_keys_error(unknown: list[str]) -> ValueError:
    """The one message for keys the schema lacks (each with its closest known key)."""
    return ValueError(f"unknown config key(s): {', '.join(unknown)}. Every key must exist in the schema "
                      "(panda/config.py); `+key=value` cannot add new ones.")


def check_known_keys(cfg: DictConfig) -> None:
    unknown = unknown_keys(cfg)
    if unknown:
        raise unknown_keys_error(unknown)


def check_llm_folders(cfg: TrainConfig) -> None:
    """Before a run builds anything: ``llm.pretrained`` / ``llm.tokenizer`` name folders on this
    machine (not in :func:`validate`: a checkpoint's config is read elsewhere, without them)."""
    import os

    from panda.errors import ConfigError

    for key in ("pretrained", "tokenizer"):
        path = getattr(cfg.llm, key)
        if path and not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"llm.{key}={path}: no such folder; set llm.{key} to a local Hugging Face folder "
                              + ("(config.json, weights, tokenizer files)" if key == "pretrained" else
                                 "(tokenizer.json or tokenizer.model, tokenizer_config.json)"))
    if cfg.llm.pretrained and not os.path.isfile(os.path.join(os.path.expanduser(cfg.llm.pretrained), "config.json")):
        raise ConfigError(f"llm.pretrained={cfg.llm.pretrained} holds no config.json: it is not a Hugging Face model "
                          "folder (point llm.pretrained at the folder with config.json and the weights)")


def to_evaluate_config(cfg: DictConfig | EvaluateConfig) -> EvaluateConfig:
    if isinstance(cfg, EvaluateConfig):
        return cfg
    check_known_keys(cfg)
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ValueError("evaluate.py needs checkpoint=PATH (a train.py .ckpt, a panda export folder or a release folder)")
    cfg = OmegaConf.to_object(cfg)
    import_plugins(cfg.plugins)
    return cfg


def to_plain(cfg) -> dict:
    """A dataclass config as plain Python (enums as strings): what checkpoints and loggers store."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def distill_active(cfg: TrainConfig) -> bool:
    """Distillation runs when a teacher is configured and the loss is not ``off``."""
    return cfg.teacher.kind != "none" and cfg.distill.loss != "off"


def validate(cfg: TrainConfig) -> None:
    """Checks that need more than types (unknown choices already failed at composition); each
    raises ``ValueError`` naming the key and the fix."""
    cfg.stab.validate()
    PROJECTORS[cfg.model.projector]  # a registered projector (else: the names there are, and how to add one)
    from panda.data.budget import sampling_rule

    sampling_rule(cfg.data, cfg.stab, cfg.frames)  # data.sampling's limits against STAB's chunk and token sizes
    if cfg.data.video_backend == VideoBackend.torchcodec:
        from panda.data.video import check_backend

        check_backend("torchcodec")  # not installed here: stop now, naming the install, not per sample
    if cfg.frames < 1:
        raise ValueError(f"frames={cfg.frames} must be >= 1")
    if cfg.frames % cfg.stab.chunk_size:
        raise ValueError(
            f"frames={cfg.frames} must be a multiple of stab.chunk_size={cfg.stab.chunk_size} "
            f"(set stab.chunk_size to a divisor of frames, e.g. stab.chunk_size={cfg.frames})"
        )
    check_teacher_config(cfg.teacher)
    if not cfg.stab.reducer.keeps_layout and distill_active(cfg):
        raise ValueError(f"stab.lsd={cfg.stab.lsd}: its tokens have no place in the frame, so there is no "
                         "teacher patch to distil each into; set teacher=none (or distill.loss=off)")
    if cfg.stab.compresses and distill_active(cfg):
        raise ValueError("stab.merge_keep / stab.temporal_pool: a compressed frame's tokens no longer cover the frame "
                         "patch by patch, so there is no teacher patch for each; set teacher=none (or distill.loss=off)")
    if cfg.data.synthetic is not None:
        cfg.data.synthetic.validate()
    from panda.data.conversation import CHAT, TEMPLATES

    for key in ("template", "eval_template"):
        name = getattr(cfg.model, key)
        if name != CHAT and name not in TEMPLATES:
            raise ValueError(f"model.{key}={name} is not a chat format; choose one of {sorted(TEMPLATES) + [CHAT]}")
        if name == CHAT and cfg.model.tokenization != Tokenization.spans:
            raise ValueError(f"model.{key}=chat (the tokenizer's own chat template) supervises by character spans; "
                             f"add model.tokenization=spans (model.tokenization=release is the Vicuna release's rule)")
    if cfg.llm.adapter != Adapter.none and not cfg.stage.train_llm:
        raise ValueError(f"llm.adapter={cfg.llm.adapter}: stage {cfg.stage.name!r} does not train the LLM "
                         "(stage.train_llm=false), so its adapters would never train; drop llm.adapter for this stage "
                         "(the stages that train the LLM: stage=pretrain, stage=finetune, stage=scratch)")
    if cfg.llm.adapter != Adapter.none:
        from panda.models.adapters import check_adapter

        check_adapter(cfg.llm.adapter, cfg.llm.lora, cfg.trainer.accelerator)
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
    from panda.data.mixture import check_mixture

    check_mixture(cfg.data, cfg.stab, cfg.frames)  # data.sources: names, weights, caps, each source's frame sampling
    if cfg.data.pack_length is not None and cfg.data.pack_length < 1:
        raise ValueError(f"data.pack_length={cfg.data.pack_length} must be >= 1 (or null: the longest sample of each micro-batch)")
    if not 0.0 <= cfg.data.max_skipped_fraction <= 1.0:
        raise ValueError(f"data.max_skipped_fraction={cfg.data.max_skipped_fraction} must be in [0, 1] (1.0: stop only "
                         "when a whole epoch is skipped)")
    if not 0.0 < cfg.data.fraction <= 1.0:
        raise ValueError(f"data.fraction={cfg.data.fraction} must be in (0, 1]")
    if not (cfg.stage.train_stab or cfg.stage.train_projector or cfg.stage.train_llm):
        raise ValueError(f"stage {cfg.stage.name!r} trains nothing: set one of stage.train_* to true")
