"""One training run end to end: setup -> fit -> export -> held-out evaluation -> summary.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import lightning as L
import torch

from panda.build import build_datamodule, build_model, build_tokenizer, frame_pipeline
from panda.config import (FOLDER_INITS, BenchmarkConfig, Derived, JudgeConfig, TrainConfig, check_llm_folders, distill_active,
                          to_plain, to_train_config)
from panda.data.conversation import get_template
from panda.data.mixture import check_source_paths, mixture_sources
from panda.data.prepare import prepare_rejected_records
from panda.data.synthetic import generate
from panda.data.tokenizer import save_tokenizer
from panda.errors import ConfigError
from panda.evaluation.benchmarks import load_benchmark
from panda.evaluation.judge import build_judge
from panda.evaluation.run import run_benchmark, scalar_metrics
from panda.loading import read_checkpoint_meta
from panda.models.checkpoints import export_release, model_meta
from panda.models.flops import BatchFlops, stab_forward_flops, teacher_forward_flops
from panda.models.teachers import build_teacher
from panda.runs import discard_run_dir, experiment_choice, git_commit, hydra_run_dir, print_summary, resume_command, run_dir_of
from panda.training.callbacks import GracefulInterrupt, LossTracker, SkippedSamplesGuard, mark_complete
from panda.training.fsdp import builds_on_meta
from panda.training.module import PandaModule
from panda.training.monitor import HeldOutMonitor
from panda.training.nonfinite import NonFiniteStepsError
from panda.training.trainer import (
    LOGGERS,
    build_callbacks,
    build_logger,
    build_trainer,
    check_multirun_launch,
    config_differences,
    find_resume_checkpoint,
    nothing_left,
    quiet_lightning,
    resolve_accumulation,
)

log = logging.getLogger(__name__)

HELDOUT_DIR = "heldout"  # run_dir/heldout/{predictions,judgements}.jsonl: the same files evaluate.py writes


@dataclass
class Session:
    """Everything one run builds before ``fit``; the step functions below read it."""

    cfg: TrainConfig
    derived: Derived
    run_dir: str
    resume_from: str | None
    tokenizer: object
    module: PandaModule
    datamodule: object
    trainer: L.Trainer
    tracker: LossTracker
    interrupt: GracefulInterrupt
    logger: object
    data_prep_s: float

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")


@quiet_lightning()  # Lightning's noise that does not apply to panda runs, for this run only
def train(cfg) -> dict:
    """Train (and evaluate) as ``cfg`` says. Returns the summary that is also written to ``summary.json``."""
    start = time.time()
    cfg = to_train_config(cfg)
    check_llm_folders(cfg)
    if cfg.data.synthetic is None:  # each source a records file or a folder, before anything is built (generated: later)
        check_source_paths(mixture_sources(cfg.data))
    LOGGERS[cfg.logger.kind]  # a registered logger (a logger yaml of your own may name another), before any folder
    check_multirun_launch(cfg)
    run_dir, resume_from, checkpoint = locate_run(cfg)
    if checkpoint is not None and nothing_left(cfg, checkpoint["global_step"], checkpoint["epoch"]):
        if hydra_run_dir() not in (None, run_dir):  # the folder Hydra made for this call holds nothing
            discard_run_dir(hydra_run_dir())
        return report_finished(cfg, run_dir, checkpoint)
    session = setup(cfg, run_dir, resume_from, checkpoint)
    status, summary = "failed", {}
    try:
        fit_s = fit(session)
        summary = run_facts(session) | training_results(session) | {"time/fit_s": round(fit_s, 2)}
        if session.interrupt.stopped:  # Ctrl-C: the checkpoint is saved; no export, no evaluation
            summary["status"] = "interrupted"
        elif nonfinite_stopped(session):  # the last finite state is saved; the run fails after the summary
            summary["status"] = "nonfinite"
        else:
            summary |= export_final(session)
            summary |= evaluate_heldout(session)
        summary["time/wall_s"] = round(time.time() - start, 2)
        write_summary(session, summary)
        if summary.get("status") == "nonfinite":
            raise NonFiniteStepsError(session.module.nonfinite.stop_message(
                summary["checkpoint"], session.cfg.stage.lr, session.cfg.trainer.precision))
        if session.interrupt.stopped:
            print(f"panda: interrupted at step {summary['train/steps']}; checkpoint {summary['checkpoint']}\n"
                  f"Resume with:\n  {resume_command(run_dir)}", flush=True)
        status = "success"
    finally:  # the logger is always closed, also when training crashed
        close_logger(session, status)
    return summary


def locate_run(cfg: TrainConfig) -> tuple[str, str | None, dict | None]:
    """(run directory, checkpoint to resume from, its contents but the tensors), as ``resume`` says:
    ``none``; ``last`` (this run dir's last checkpoint); a checkpoint's path; or ``auto``, the newest
    complete checkpoint of this run's name, in the run directory it belongs to — refused when that
    run's config differs in more than its step limits."""
    run_dir = run_dir_of(cfg)
    if cfg.resume == "none":
        return run_dir, None, None
    if cfg.resume != "auto":
        path = os.path.join(run_dir, "checkpoints", "last.ckpt") if cfg.resume == "last" else cfg.resume
        if not os.path.exists(path):
            raise ConfigError(f"resume={cfg.resume}: {path} does not exist (resume=last continues the run in "
                              "hydra.run.dir; resume=auto finds this run's newest checkpoint; resume=PATH a .ckpt)")
        return run_dir, path, read_checkpoint_meta(path)
    marker = find_resume_checkpoint(os.path.abspath(cfg.runs_root), cfg.name, run_dir)
    if marker is None:
        log.info("resume=auto: no complete checkpoint of %r yet; starting fresh", cfg.name)
        return run_dir, None, None
    resume_from = marker["path"]
    run_dir = os.path.dirname(os.path.dirname(resume_from))
    checkpoint = read_checkpoint_meta(resume_from)
    saved = checkpoint.get("hyper_parameters", {}).get("cfg")
    differences = config_differences(saved, to_plain(cfg)) if saved else []
    if differences:
        raise ValueError(f"resume=auto: the run in {run_dir} was trained with another config; it can only be continued "
                         f"with a different step limit (trainer.max_steps / max_epochs). Differences:\n  "
                         + "\n  ".join(differences) + "\nStart a new run instead (another name=, or resume=none).")
    log.info("resume=auto: continuing %s from %s", run_dir, resume_from)
    return run_dir, resume_from, checkpoint


def report_finished(cfg: TrainConfig, run_dir: str, checkpoint: dict) -> dict:
    """A checkpoint that already reached this config's limits: say so, touch nothing, return its summary."""
    step, epoch = checkpoint["global_step"], checkpoint["epoch"]
    print(f"panda: the run in {run_dir} already reached step {step} (epoch {epoch}); with trainer.max_steps="
          f"{cfg.trainer.max_steps} and trainer.max_epochs={cfg.trainer.max_epochs} there is nothing left to train, "
          "so nothing was changed. Raise trainer.max_steps (or max_epochs) to continue it.", flush=True)
    path = os.path.join(run_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"run_dir": run_dir, "train/steps": step}


def setup(cfg: TrainConfig, run_dir: str, resume_from: str | None = None, checkpoint: dict | None = None) -> Session:
    """Data (the synthetic default is generated once), teacher, tokenizer, model, loggers, Trainer."""
    os.makedirs(run_dir, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    prep_start = time.time()
    if cfg.data.synthetic is not None:
        generate(cfg.data.synthetic, cfg.data.root)
    data_prep_s = time.time() - prep_start

    teacher = build_teacher(cfg.teacher) if distill_active(cfg) else None
    if teacher is None and cfg.teacher.kind != "none":
        log.info("distill.loss=off: the teacher is not loaded")
    tokenizer = build_tokenizer(cfg)
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    save_tokenizer(tokenizer, tokenizer_dir)  # checkpoints point at the run's own copy
    derived = Derived(  # the head's width and the teacher's copy of the frames follow the teacher actually loaded
        accumulate_grad_batches=resolve_accumulation(cfg), tokenizer=tokenizer_dir,
        **({"teacher_width": teacher.width, "teacher_image_size": teacher.image_size,
            "teacher_patch_size": teacher.patch_size} if teacher is not None else {}))
    model = build_model(cfg, tokenizer, derived, meta=builds_on_meta(cfg))  # FSDP: rank 0 reads, the others receive
    if cfg.init.kind in FOLDER_INITS:  # evaluation rebuilds this architecture without the folder
        derived = dataclasses.replace(derived, llm_config=model.llm.config.to_dict())
    module = PandaModule(model, cfg, derived, teacher=teacher)
    logger = build_logger(cfg, run_dir, model.parameter_counts(), resume_step=checkpoint["global_step"] if checkpoint else None)
    teacher_cfg = getattr(teacher, "cfg", None)
    flops = BatchFlops(model, cfg.stage, stab_forward_flops(cfg.stab, cfg.stab.chunk_size) / cfg.stab.chunk_size,
                       teacher_forward_flops(teacher_cfg, 1) if teacher_cfg is not None else 0.0)
    callbacks, tracker, interrupt = build_callbacks(cfg, os.path.join(run_dir, "checkpoints"), flops)
    callbacks += heldout_monitor(cfg, tokenizer, derived, run_dir)
    trainer = build_trainer(cfg, derived, run_dir, logger, callbacks)
    datamodule = build_datamodule(cfg, tokenizer, derived, rejects_path=os.path.join(run_dir, "rejects.jsonl"))
    if checkpoint is not None:  # before fit: FSDP starts (and workers prefetch from) the loader before it restores
        datamodule.preload_position(checkpoint)
    return Session(cfg, derived, run_dir, resume_from, tokenizer, module, datamodule, trainer, tracker, interrupt, logger,
                   data_prep_s)


def heldout_monitor(cfg: TrainConfig, tokenizer, derived: Derived, run_dir: str) -> list:
    """The validation-loss and samples-table callback, when the run has a held-out split."""
    if cfg.logger.val_every_n_steps <= 0 or not cfg.data.eval_qa:
        return []
    try:
        bench = load_benchmark(BenchmarkConfig(name=HELDOUT_DIR, root=cfg.data.root, qa_dir=cfg.data.eval_qa,
                                               limit=max(cfg.logger.val_loss_items, cfg.logger.table_items)))
    except (OSError, ValueError) as exc:  # the end-of-run evaluation reports a missing split in full
        log.warning("no held-out validation during training: %s", exc)
        return []
    return [HeldOutMonitor(bench.qa, bench.video_dir, tokenizer,
                           get_template(cfg.model.template, str(cfg.model.tokenization), tokenizer),
                           get_template(cfg.model.eval_template, str(cfg.model.tokenization), tokenizer),
                           frame_pipeline(cfg, derived, with_teacher=distill_active(cfg)), cfg.model.max_length,
                           cfg.stab.max_tokens_per_frame(), cfg.logger.val_every_n_steps, cfg.logger.val_loss_items,
                           cfg.logger.table_items, os.path.join(run_dir, "samples"))]


def fit(s: Session) -> float:
    """``Trainer.fit`` (resuming where asked), then the final checkpoint marked complete; returns seconds."""
    start = time.time()
    s.trainer.fit(s.module, datamodule=s.datamodule, ckpt_path=s.resume_from)
    if not s.cfg.trainer.fast_dev_run:
        final = os.path.join(s.ckpt_dir, "last.ckpt")
        s.trainer.save_checkpoint(final)
        mark_complete(s.trainer, final, finished=not (s.interrupt.stopped or nonfinite_stopped(s)))
    return time.time() - start


def nonfinite_stopped(s: Session) -> bool:
    """The non-finite step guard stopped the run (``trainer.max_nonfinite_steps`` bad steps in a row)."""
    return s.module.nonfinite is not None and s.module.nonfinite.stopped


def run_facts(s: Session) -> dict:
    cfg = s.cfg
    return {"run_dir": s.run_dir, "name": cfg.name, "experiment": experiment_choice(), "seed": cfg.seed,
            "stage": cfg.stage.name, "frames": cfg.frames, "git_commit": git_commit(),
            "time/data_prep_s": round(s.data_prep_s, 2)}


def training_results(s: Session) -> dict:
    fractions = s.module.padded_fractions
    shards = [src.path for src in mixture_sources(s.cfg.data) if src.kind == "shards"]
    final = os.path.join(s.ckpt_dir, "last.ckpt")
    return {
        "train/loss_first": s.tracker.first,
        "train/loss_final": s.tracker.final,
        "train/steps": s.trainer.global_step,
        "train/loss_by_step": [[step, round(loss, 6)] for step, loss in s.tracker.history],
        "train/skipped_samples": s.module.skipped_samples,
        # optimiser steps skipped for a non-finite loss or gradient norm (None: trainer.max_nonfinite_steps=0)
        "train/nonfinite_steps": s.module.nonfinite.total if s.module.nonfinite is not None else None,
        "train/padded_fraction_mean": sum(fractions) / len(fractions) if fractions else None,
        "train/padded_fraction_all_mean": (float(torch.stack(s.module.padded_fractions_all).double().mean())
                                           if s.module.padded_fractions_all else None),
        "data/rejected_records": len(s.datamodule.rejects),
        "data/prepare_rejected_records": prepare_rejected_records(shards) if shards else None,
        **source_results(s),
        "checkpoint": final if os.path.exists(final) else None,
        **s.module.model.parameter_counts(),
        **{f"trainable/{k}": v for k, v in s.module.trainable.items()},
    }


def source_results(s: Session) -> dict:
    """Per source of the mixture: samples read, their share, skipped by reason (SkippedSamplesGuard),
    and the records left out before training (a records file's malformed ones; prepare's for shards)."""
    guard = next((c for c in s.trainer.callbacks if isinstance(c, SkippedSamplesGuard)), None)
    out = guard.source_summary() if guard is not None else {}
    for src in mixture_sources(s.cfg.data):
        if src.kind == "records":
            out[f"data/rejected_records/{src.name}"] = s.datamodule.rejected_by_source.get(src.name, 0)
        else:
            out[f"data/prepare_rejected_records/{src.name}"] = prepare_rejected_records([src.path])
    return out


def export_final(s: Session) -> dict:
    """With ``export_final``: ``run_dir/final``, a release-format folder the next stage starts from.
    Under FSDP every rank takes part in gathering the full weights; rank 0 writes them."""
    if not s.cfg.export_final:
        return {}
    model = s.module.model
    if s.module.sharded:
        from panda.training.fsdp import full_state_dict

        state = full_state_dict(model)
        if s.trainer.is_global_zero:
            model = build_model(s.cfg, s.tokenizer, s.derived, initialise=False)
            model.load_state_dict(state)
    if not s.trainer.is_global_zero:
        return {}
    meta = model_meta(model, frames=s.cfg.frames, template=s.cfg.model.template, eval_template=s.cfg.model.eval_template,
                      tokenization=str(s.cfg.model.tokenization))
    final = export_release(model, os.path.join(s.run_dir, "final"), meta)
    return {"export": save_tokenizer(s.tokenizer, final)}


def evaluate_heldout(s: Session) -> dict:
    """The run's held-out split (``data.eval_qa``) through evaluate.py's path: greedy answers, the
    offline exact-match judge, the same metrics (``eval/accuracy`` = yes / judged, missing videos
    counted apart) and the same files under ``run_dir/heldout/``."""
    cfg = s.cfg
    if not (cfg.evaluate and cfg.data.eval_qa):
        reason = "evaluate=false" if not cfg.evaluate else \
            "no held-out split: set data.eval_qa=FOLDER (test_q.json, test_a.json, videos/; relative to data.root)"
        log.info("held-out evaluation skipped: %s", reason)
        return {"eval/skipped": reason}
    if s.module.sharded and s.trainer.world_size > 1:
        log.info("FSDP run: held-out evaluation skipped here; run evaluate.py on the checkpoint or the export")
        return {}
    if not s.trainer.is_global_zero:
        return {}
    start = time.time()
    folder = os.path.join(s.run_dir, HELDOUT_DIR)
    shutil.rmtree(folder, ignore_errors=True)  # answers of an earlier checkpoint of this run dir are stale
    bench = load_benchmark(BenchmarkConfig(name=HELDOUT_DIR, root=cfg.data.root, qa_dir=cfg.data.eval_qa, limit=cfg.data.eval_limit))
    res = run_benchmark(s.module.model, s.tokenizer, bench, folder, frame_pipeline(cfg),
                        get_template(cfg.model.eval_template, str(cfg.model.tokenization), s.tokenizer),
                        build_judge(JudgeConfig()), cfg.data.eval_batch_size, cfg.max_new_tokens, cfg.data.num_workers)
    metrics = scalar_metrics(res, "eval/")
    if s.logger:
        s.logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=s.trainer.global_step)
    return metrics | {"time/eval_s": round(time.time() - start, 2)}


def write_summary(s: Session, summary: dict) -> None:
    if s.trainer.is_global_zero:
        with open(os.path.join(s.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print_summary(summary)


def close_logger(s: Session, status: str) -> None:
    if s.logger:
        s.logger.finalize(status)
        if s.cfg.logger.kind == "wandb":
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)
