"""One training run end to end: data, model, Lightning fit, held-out evaluation, summary.json."""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from panda.config import validate
from panda.data.datamodule import VideoDataModule
from panda.data.synthetic import SyntheticConfig, generate
from panda.evaluation.qa import generate_answers, score_exact_match, write_predictions
from panda.models.checkpoints import export_release, model_meta
from panda.models.teachers import build_teacher
from panda.training.build import FOLDER_INITS, build_logger, build_model, build_tokenizer, distill_active
from panda.training.module import PandaModule

log = logging.getLogger(__name__)


class LossTracker(Callback):
    """Keeps the training losses of this process: ``history`` (global step, loss) of every
    optimisation step it ran, and ``final`` = the mean of the last ``window``."""

    def __init__(self, window: int = 10):
        self.losses = collections.deque(maxlen=window)
        self.history: list[tuple[int, float]] = []
        self.first = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs is not None:
            loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
            self.first = loss if self.first is None else self.first
            self.losses.append(loss)
            self.history.append((trainer.global_step, loss))

    @property
    def final(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None


COMPLETE_MARKER = "complete.json"


def mark_complete(trainer, path: str) -> None:
    """Record ``path`` as the newest fully written checkpoint (after every rank finished writing)."""
    trainer.strategy.barrier("checkpoint-written")
    if trainer.is_global_zero:
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, COMPLETE_MARKER + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"path": os.path.abspath(path), "step": trainer.global_step, "time": time.time()}, f)
        os.replace(tmp, os.path.join(folder, COMPLETE_MARKER))  # atomic: a reader sees the old or the new marker


class MarkedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that names each checkpoint complete only once it is fully on disk, so
    ``resume=auto`` never picks a checkpoint a killed job left half-written."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        mark_complete(trainer, filepath)


def find_resume_checkpoint(runs_root: str, name: str, run_dir: str) -> str | None:
    """The newest complete checkpoint of this run dir, else of any run dir of the same name."""
    own = os.path.join(run_dir, "checkpoints", COMPLETE_MARKER)
    candidates = [own] if os.path.exists(own) else glob.glob(os.path.join(runs_root, name, "*", "checkpoints", COMPLETE_MARKER))
    best = None
    for marker in candidates:
        with open(marker) as f:
            info = json.load(f)
        if os.path.exists(info["path"]) and (best is None or info["time"] > best["time"]):
            best = info
    return best["path"] if best else None


def check_multirun_launch(cfg) -> None:
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
    multi = t.strategy in ("ddp", "fsdp") and (count_devices(t.devices, t.accelerator) * t.num_nodes > 1)
    launcher = str(hc.launcher.get("_target_", ""))
    if multi and "submitit" not in launcher and "SLURM_NTASKS" not in os.environ:
        raise ValueError(
            f"--multirun with trainer.strategy={t.strategy} on {t.devices} devices would start every sweep point's "
            "processes inside the sweep (each rank re-runs the sweep): use hydra/launcher=slurm (one job per point) "
            "or run the points one at a time"
        )


def git_commit() -> str | None:
    """The commit of the panda checkout this runs from (None outside a git checkout)."""
    import subprocess

    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def experiment_choice() -> str | None:
    """The ``experiment=`` config this run composed (None outside Hydra or without one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("experiment")
    except ValueError:
        return None


def run_dir_of(cfg) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except ValueError:  # not under Hydra (e.g. called from Python)
        return os.path.abspath(cfg.get("run_dir") or "outputs/run")


# Lightning cannot see that the data module restores the loader position itself (EpochBatchSampler
# + VideoDataModule.state_dict); its mid-epoch warning does not apply to panda runs
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def build_trainer(cfg: dict, run_dir: str, logger, callbacks) -> L.Trainer:
    t = cfg["trainer"]
    extra = {}
    if t["limit_train_batches"] is not None:
        extra["limit_train_batches"] = t["limit_train_batches"]
    strategy = t["strategy"]
    if strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = count_devices(t["devices"], t["accelerator"]) * t["num_nodes"]
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                         save_distributed_checkpoint=t["fsdp"]["distributed_checkpoint"])
    return L.Trainer(
        accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"], strategy=strategy,
        precision=t["precision"], max_epochs=t["max_epochs"], max_steps=t["max_steps"],
        gradient_clip_val=t["gradient_clip_val"], accumulate_grad_batches=t["accumulate_grad_batches"],
        log_every_n_steps=t["log_every_n_steps"], fast_dev_run=t["fast_dev_run"], overfit_batches=t["overfit_batches"],
        deterministic=t["deterministic"], enable_progress_bar=t["enable_progress_bar"], default_root_dir=run_dir,
        logger=logger, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module's EpochBatchSampler splits ranks itself
        **extra,
    )


def count_devices(devices, accelerator: str) -> int:
    """How many processes per node ``trainer.devices`` means."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        return max(1, torch.cuda.device_count()) if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    return int(devices)


def resolve_accumulation(container: dict) -> None:
    """Derive ``trainer.accumulate_grad_batches`` from ``trainer.global_batch_size`` (the recipe's one knob)."""
    t = container["trainer"]
    target = t["global_batch_size"]
    if target is None:
        return
    world = count_devices(t["devices"], t["accelerator"]) * t["num_nodes"]
    per_step = container["data"]["batch_size"] * world
    if target % per_step:
        raise ValueError(
            f"trainer.global_batch_size={target} is not a multiple of data.batch_size × devices × num_nodes = "
            f"{container['data']['batch_size']} × {world // t['num_nodes']} × {t['num_nodes']} = {per_step}; "
            "change data.batch_size or trainer.global_batch_size"
        )
    if t["accumulate_grad_batches"] not in (1, target // per_step):
        raise ValueError("set either trainer.global_batch_size or trainer.accumulate_grad_batches, not both")
    t["accumulate_grad_batches"] = target // per_step
    log.info("global batch %d = %d per device × %d processes × %d accumulation", target,
             container["data"]["batch_size"], world, t["accumulate_grad_batches"])


def train(cfg: DictConfig) -> dict:
    """Train (and evaluate) as ``cfg`` says. Returns the summary that is also written to ``summary.json``."""
    start = time.time()
    validate(cfg)
    check_multirun_launch(cfg)
    run_dir = run_dir_of(cfg)
    resume_from = None
    if cfg.resume == "auto":
        resume_from = find_resume_checkpoint(os.path.abspath(cfg.runs_root), cfg.name, run_dir)
        if resume_from:  # continue in the run dir that checkpoint belongs to
            run_dir = os.path.dirname(os.path.dirname(resume_from))
            log.info("resume=auto: continuing %s from %s", run_dir, resume_from)
        else:
            log.info("resume=auto: no complete checkpoint of %r yet; starting fresh", cfg.name)
    elif cfg.resume != "none":
        raise ValueError(f"resume={cfg.resume!r}: use none or auto (ckpt_path=PATH resumes from a given checkpoint)")
    os.makedirs(run_dir, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)

    container = OmegaConf.to_container(cfg, resolve=True)
    container["data"]["root"] = os.path.abspath(container["data"]["root"])
    if container["data"]["synthetic"] is not None:
        generate(SyntheticConfig(root=container["data"]["root"], **container["data"]["synthetic"]))
    data_time = time.time() - start

    resolve_accumulation(container)

    teacher = None
    if distill_active(container):
        teacher = build_teacher(container["teacher"], container["stab"]["chunk_size"])
        # the head's width and the teacher's copy of the frames follow the teacher actually loaded
        container["teacher"].update(width=teacher.width, image_size=teacher.image_size, patch_size=teacher.patch_size)
    elif container["teacher"]["kind"] != "none":
        log.info("distill.loss=off: the teacher is not loaded")

    tokenizer = build_tokenizer(container)
    tok_dir = os.path.join(run_dir, "tokenizer")
    tokenizer.save_pretrained(tok_dir)
    container["llm"]["tokenizer"] = tok_dir  # checkpoints point at the run's own copy
    model = build_model(container, tokenizer)
    if container["init"]["kind"] in FOLDER_INITS:  # evaluation rebuilds this architecture without the folder
        container["llm"]["hf_config"] = model.llm.config.to_dict()
    module = PandaModule(model, container, teacher=teacher)
    counts = model.parameter_counts()

    logger = build_logger(container, run_dir, counts)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tracker = LossTracker()
    checkpoint = MarkedCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                                 every_n_train_steps=container["trainer"]["checkpoint_every_n_steps"], save_last=True, save_top_k=1)
    trainer = build_trainer(container, run_dir, logger, [checkpoint, tracker])
    datamodule = VideoDataModule(cfg=OmegaConf.create(container), tokenizer=tokenizer,
                                 rejects_path=os.path.join(run_dir, "rejects.jsonl"), with_teacher=teacher is not None)

    summary: dict = {"run_dir": run_dir, "name": container["name"], "experiment": experiment_choice(),
                     "seed": container["seed"], "stage": container["stage"]["name"], "frames": container["frames"],
                     "git_commit": git_commit()}
    status = "failed"
    try:
        fit_start = time.time()
        fit_ckpt = resume_from or container["ckpt_path"]
        datamodule.preload_position(os.path.join(ckpt_dir, "last.ckpt") if fit_ckpt == "last" else fit_ckpt)
        trainer.fit(module, datamodule=datamodule, ckpt_path=fit_ckpt)
        fit_time = time.time() - fit_start
        final_ckpt = os.path.join(ckpt_dir, "last.ckpt")
        if not container["trainer"]["fast_dev_run"]:
            trainer.save_checkpoint(final_ckpt)
            mark_complete(trainer, final_ckpt)
        sharded = type(trainer.strategy).__name__ == "ModelParallelStrategy"
        summary.update({
            "train/loss_first": tracker.first,
            "train/loss_final": tracker.final,
            "train/steps": trainer.global_step,
            "train/loss_by_step": [[step, round(loss, 6)] for step, loss in tracker.history],
            "train/skipped_samples": module.skipped_samples,
            "train/padded_fraction_mean": (sum(module.padded_fractions) / len(module.padded_fractions)
                                           if module.padded_fractions else None),
            "data/rejected_records": len(datamodule.rejects),
            "checkpoint": final_ckpt if os.path.exists(final_ckpt) else None,
            "time/data_prep_s": round(data_time, 2),
            "time/fit_s": round(fit_time, 2),
        })
        if container["export_final"]:
            plain = model
            if sharded:  # gather the full weights (every rank takes part), rank 0 writes them unsharded
                from panda.training.fsdp import full_state_dict

                state = full_state_dict(model)
                if trainer.is_global_zero:
                    plain = build_model(container, tokenizer, initialise=False)
                    plain.load_state_dict(state)
            if trainer.is_global_zero:
                meta = model_meta(plain, frames=container["frames"], template=container["model"]["template"],
                                  eval_template=container["model"]["eval_template"])
                summary["export"] = export_release(plain, os.path.join(run_dir, "final"), tokenizer, meta)
        summary.update(counts)
        summary.update({f"trainable/{k}": v for k, v in module.trainable.items()})
        if sharded and trainer.world_size > 1 and container["evaluate"]:
            log.info("FSDP run: held-out evaluation skipped here; run evaluate.py on the checkpoint or the export")
        elif container["evaluate"] and container["data"]["eval_qa"] and trainer.is_global_zero:
            eval_start = time.time()
            metrics, rows = evaluate_qa(module.model, datamodule, tokenizer, container["max_new_tokens"])
            write_predictions(os.path.join(run_dir, "predictions.jsonl"), rows)
            summary.update(metrics)
            summary["time/eval_s"] = round(time.time() - eval_start, 2)
            if logger:
                logger.log_metrics(metrics, step=trainer.global_step)
        summary["time/wall_s"] = round(time.time() - start, 2)
        if trainer.is_global_zero:
            with open(os.path.join(run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            print_summary(summary)
        status = "success"
    finally:  # the logger is always closed, also when training crashed
        if logger:
            logger.finalize(status)
            if container["logger"]["kind"] == "wandb":
                import wandb

                wandb.finish(exit_code=0 if status == "success" else 1)
    return summary


def evaluate_qa(model, datamodule, tokenizer, max_new_tokens: int) -> tuple[dict, list]:
    """The run's held-out split, answered greedily and scored by exact match (the summary's ``eval/*``)."""
    loader = datamodule.qa_dataloader()
    predictions, failures = generate_answers(model, loader, tokenizer, max_new_tokens)
    metrics, rows = score_exact_match(loader.dataset.items, predictions, failures)
    return metrics, rows


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    lines = [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in summary.items()]
    print("\n== panda run summary ==\n" + "\n".join(lines), flush=True)


