"""The Lightning pieces of a run built from its config: Trainer, logger, callbacks, resume discovery."""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
import shlex
import sys
import warnings
from typing import Callable

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from panda.compat import csv_writer_base, set_logger_experiment
from panda.config import Derived, TrainConfig, to_plain
from panda.data.mixture import mixture_sources
from panda.registry import Registry
from panda.runs import git_commit, hydra_overrides, run_name, wandb_offline
from panda.training.callbacks import (
    COMPLETE_MARKER,
    FSDPAudit,
    GracefulInterrupt,
    LearningRateLogger,
    LossTracker,
    MarkedCheckpoint,
    NormStatisticsSync,
    SkippedSamplesGuard,
    ThroughputMonitor,
    read_marker,
)
from panda.training.monitor import GradNormLogger

log = logging.getLogger(__name__)

QUIET_WARNINGS = (
    # Lightning cannot see that the data module restores the loader position itself (EpochBatchSampler
    # + VideoDataModule.state_dict); its mid-epoch warning does not apply to panda runs
    ".*your dataloader is not resumable.*",
    # a Lightning-internal deprecation (its own pytree helper), repeated on every run: nothing a user can act on
    r".*isinstance\(treespec, LeafSpec\).*",
)
QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _QuietLightning(logging.Filter):
    """Drops Lightning's advertising tips and the dataloader-length notice from the console."""

    NOISE = ("\U0001f4a1 Tip:", "Loading `train_dataloader` to estimate number of stepping batches")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOISE)


@contextlib.contextmanager
def quiet_lightning():
    """While a run lasts: Lightning's warnings that do not apply to panda runs are ignored
    (:data:`QUIET_WARNINGS`) and its tips and notices stay off the console. On exit the warning
    filters are as they were and the log filter is gone; importing this module sets neither."""
    quiet = _QuietLightning()
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    with warnings.catch_warnings():
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.addFilter(quiet)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(quiet)


def count_devices(devices, accelerator: str) -> int:
    """How many processes per node ``trainer.devices`` means."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        return max(1, torch.cuda.device_count()) if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    return int(devices)


def world_size(cfg: TrainConfig) -> int:
    return count_devices(cfg.trainer.devices, cfg.trainer.accelerator) * cfg.trainer.num_nodes


def resolve_accumulation(cfg: TrainConfig) -> int:
    """``trainer.accumulate_grad_batches``, derived from ``trainer.global_batch_size`` when that is set
    (the recipe's one batch knob): global = data.batch_size × devices × num_nodes × accumulation."""
    t = cfg.trainer
    if t.global_batch_size is None:
        return t.accumulate_grad_batches
    world = world_size(cfg)
    per_step = cfg.data.batch_size * world
    if t.global_batch_size % per_step:
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of data.batch_size × devices × num_nodes = "
            f"{cfg.data.batch_size} × {world // t.num_nodes} × {t.num_nodes} = {per_step}; "
            "change data.batch_size or trainer.global_batch_size"
        )
    accumulation = t.global_batch_size // per_step
    if t.accumulate_grad_batches not in (1, accumulation):
        raise ValueError("set either trainer.global_batch_size or trainer.accumulate_grad_batches, not both")
    log.info("global batch %d = %d per device × %d processes × %d accumulation", t.global_batch_size,
             cfg.data.batch_size, world, accumulation)
    return accumulation


def find_resume_checkpoint(runs_root: str, name: str, run_dir: str) -> dict | None:
    """The completion marker (``path``, ``step``, ``epoch``, ``finished``) of the newest complete
    checkpoint of this run dir, else of any run dir of the same name under ``runs_root``."""
    own = read_marker(os.path.join(run_dir, "checkpoints"))
    if own is not None:
        return own
    markers = [read_marker(os.path.dirname(m)) for m in glob.glob(os.path.join(runs_root, name, "*", "checkpoints", COMPLETE_MARKER))]
    return max((m for m in markers if m is not None), key=lambda m: m["time"], default=None)


# what may change when a run is resumed: its limits and where things are (ckpt_path: the key that named
# the checkpoint to resume before resume took a path; older checkpoints hold it). A run stopped by
# non-finite steps may continue with another limit of them (it changes no computed value)
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.max_epochs", "resume", "ckpt_path", "run_dir", "runs_root",
                     "trainer.enable_progress_bar", "trainer.max_nonfinite_steps")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every setting that differs, except :data:`RESUMABLE_CHANGES`."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def nothing_left(cfg: TrainConfig, step: int, epoch: int) -> bool:
    """A checkpoint at (``step``, ``epoch``) has already reached ``cfg``'s step or epoch limit."""
    return (cfg.trainer.max_steps != -1 and step >= cfg.trainer.max_steps) or epoch >= cfg.trainer.max_epochs


def check_multirun_launch(cfg: TrainConfig) -> None:
    """``--multirun`` must not start DDP/FSDP processes inside the sweep's own process tree (each
    rank would re-run the sweep); on SLURM every sweep point is its own job and that is fine."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ValueError, ImportError):
        return
    if hc.mode != RunMode.MULTIRUN:
        return
    t = cfg.trainer
    multi = t.strategy in ("ddp", "fsdp") and world_size(cfg) > 1
    launcher = str(hc.launcher.get("_target_", ""))
    if multi and "submitit" not in launcher and "SLURM_NTASKS" not in os.environ:
        raise ValueError(
            f"--multirun with trainer.strategy={t.strategy} on {t.devices} devices would start every sweep point's "
            "processes inside the sweep (each rank re-runs the sweep): use hydra/launcher=slurm (one job per point) "
            "or run the points one at a time"
        )


class _ResumedCSVWriter(csv_writer_base()):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run keeps the rows
    logged before its checkpoint (``step`` < ``resume_step``) and appends after them."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def existing_metrics(self) -> None:
        fs = get_filesystem(self.log_dir)  # the writer's own filesystem
        if not fs.isfile(self.metrics_file_path):
            return
        with fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < self.resume_step]
        with fs.open(self.metrics_file_path, "w", newline="") as f:  # rows of steps the run will redo go
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(keys)


class RunCSVLogger(CSVLogger):
    """``run_dir/csv/metrics.csv``; with ``resume_step`` the earlier rows of a resumed run stay."""

    def __init__(self, run_dir: str, resume_step: int | None = None):
        super().__init__(run_dir, name="csv", version="")
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self.resume_step is not None:
            set_logger_experiment(self, self.resumed_writer)
        return super().experiment

    def resumed_writer(self) -> _ResumedCSVWriter:
        """The writer of a resumed run (made once, on first use)."""
        get_filesystem(self.root_dir).makedirs(self.root_dir, exist_ok=True)
        return _ResumedCSVWriter(self.log_dir, self.resume_step)


# The loggers (``logger=`` / ``logger.kind``): each a function (run config, run dir, parameter counts,
# the step a resumed run continues from) -> a Lightning logger, or False for none. Adding one = a
# function decorated with @LOGGERS.register("kind") + one yaml in a logger config folder.
LOGGERS: Registry[Callable] = Registry("logger", "logger.kind", "panda.training.trainer.LOGGERS")


def build_logger(cfg: TrainConfig, run_dir: str, parameter_counts: dict, resume_step: int | None = None):
    """The logger registered as ``logger.kind``: csv (default; a resumed run appends), wandb (offline
    unless a key is configured; one wandb run per panda run, continued on resume) or none."""
    return LOGGERS[cfg.logger.kind](cfg, run_dir, parameter_counts, resume_step)


@LOGGERS.register("none")
def no_logger(cfg: TrainConfig, run_dir: str, parameter_counts: dict, resume_step: int | None = None):
    return False


@LOGGERS.register("csv")
def csv_logger(cfg: TrainConfig, run_dir: str, parameter_counts: dict, resume_step: int | None = None):
    return RunCSVLogger(run_dir, resume_step)


@LOGGERS.register("wandb")
def wandb_logger(cfg: TrainConfig, run_dir: str, parameter_counts: dict, resume_step: int | None = None):
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    offline = wandb_offline(cfg.logger.offline, run_dir)
    id_file = os.path.join(run_dir, "wandb_run_id")
    run_id = None
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    elif rank_zero_only.rank == 0:  # only rank 0 talks to wandb
        import secrets

        run_id = secrets.token_hex(6)  # wandb run ids: lower-case letters and digits
        with open(id_file, "w") as f:
            f.write(run_id)
    # logged once, with what made the run: the command line, its overrides and the commit
    # (sys.argv[0] unquoted: ``panda train`` names the command in one word of argv, panda/cli.py)
    provenance = {"command": " ".join([sys.argv[0], *map(shlex.quote, sys.argv[1:])]), "overrides": hydra_overrides(),
                  "git_commit": git_commit()}
    return WandbLogger(id=run_id, resume="allow", project=cfg.logger.project, group=cfg.logger.group,
                       name=run_name(cfg.name), tags=list(cfg.logger.tags), save_dir=run_dir, offline=offline,
                       config=to_plain(cfg) | parameter_counts | provenance)


def build_callbacks(cfg: TrainConfig, ckpt_dir: str, flops=None) -> tuple[list, LossTracker, GracefulInterrupt]:
    """Checkpointing, the loss history, Ctrl-C handling, throughput (and MFU, given the model's
    ``flops``), learning rates and the FSDP helpers."""
    tracker, interrupt = LossTracker(), GracefulInterrupt()
    checkpoint = MarkedCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                                  every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_last=True, save_top_k=1)
    callbacks = [checkpoint, tracker, interrupt, ThroughputMonitor(flops, peak_tflops(cfg) if flops else None),
                 LearningRateLogger(), GradNormLogger(),
                 # skipped samples (the stop, and per source of the mixture with the sources' shares)
                 SkippedSamplesGuard(cfg.data.max_skipped_fraction, cfg.trainer.log_every_n_steps,
                                     sources=mixture_sources(cfg.data))]
    if cfg.trainer.strategy == "fsdp":
        callbacks += [NormStatisticsSync(), FSDPAudit()]
    if cfg.trainer.audit_syncs:  # last: its count spans the other callbacks' batch hooks too
        from panda.training.syncs import SyncAudit

        callbacks.append(SyncAudit(os.path.join(os.path.dirname(ckpt_dir), "syncs.json")))
    return callbacks, tracker, interrupt


def peak_tflops(cfg: TrainConfig) -> float | None:
    """``trainer.peak_tflops``, else the GPU's dense bf16 peak by name, else (CPU) the measured matmul rate."""
    from panda.models.flops import device_peak_tflops, measured_matmul_tflops

    if cfg.trainer.peak_tflops:
        return cfg.trainer.peak_tflops
    if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available():
        return measured_matmul_tflops()
    peak = device_peak_tflops()
    if peak is None:
        log.info("perf/mfu: unknown GPU %s; set trainer.peak_tflops to log MFU", torch.cuda.get_device_name(0))
    return peak


def build_trainer(cfg: TrainConfig, derived: Derived, run_dir: str, logger, callbacks) -> L.Trainer:
    t = cfg.trainer
    extra = {}
    if t.limit_train_batches is not None:
        extra["limit_train_batches"] = t.limit_train_batches
    strategy = str(t.strategy)
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world_size(cfg), tensor_parallel_size=1,
                                         save_distributed_checkpoint=t.fsdp.distributed_checkpoint)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_epochs=t.max_epochs, max_steps=t.max_steps,
        gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=derived.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps, fast_dev_run=t.fast_dev_run, overfit_batches=t.overfit_batches,
        deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar, default_root_dir=run_dir,
        enable_model_summary=False,  # panda prints its own per-part parameter table (PandaModule.on_fit_start)
        logger=logger, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module's EpochBatchSampler splits ranks itself
        **extra,
    )
