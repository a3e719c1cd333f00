"""The LightningModule: stages (what trains), optimiser groups, schedule, losses and logging."""

from __future__ import annotations

import dataclasses
import logging
import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from panda.config import Derived, StageConfig, TrainConfig, to_plain
from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from panda.models.adapters import has_adapter, set_adapter_trainable
from panda.models.video_lm import VideoLanguageModel
from panda.training.nonfinite import NonFiniteGuard

log = logging.getLogger(__name__)


UNKNOWN_TOKENS_WARNING = 0.05  # share of <unk> text tokens in a batch above which the run warns (once)


def apply_stage(model: VideoLanguageModel, stage: StageConfig) -> dict[str, int]:
    """Freeze/unfreeze STAB, projector and LLM for ``stage``; returns trainable parameters per module.
    The distillation head trains with STAB (it exists only to shape STAB's tokens). An LLM with LoRA
    adapters (``llm.adapter``) trains its adapters only, when the stage trains the LLM."""
    parts = {"stab": (model.stab, stage.train_stab), "projector": (model.projector, stage.train_projector),
             "llm": (model.llm, stage.train_llm)}
    if model.distill_head is not None:
        parts["distill_head"] = (model.distill_head, stage.train_stab)
    counts = {}
    for name, (module, trainable) in parts.items():
        if module is model.llm and has_adapter(module):
            set_adapter_trainable(module, trainable)
        else:
            module.requires_grad_(trainable)
        counts[name] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return counts


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and learned tokens/queries (1-D once size-1 dims are dropped) get no weight decay."""
    return sum(size > 1 for size in param.shape) <= 1  # the global shape: also right for sharded (DTensor) parameters


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str, min_ratio: float):
    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def start_after_finished_epoch(checkpoint: dict) -> None:
    """Make a checkpoint written after an epoch closed resume at the start of the next epoch.

    Such a checkpoint (the end of a ``max_epochs`` run) counts the epoch as completed but still
    holds that epoch's batch counters (``current`` = its batches, ``is_last_batch``). When a run
    has a step limit (``trainer.max_steps``), Lightning restarts from them as if they were the next
    epoch's: its fetcher starts counting at that many batches, so the next epoch ended after
    (batches per epoch - batches of the closed one) batches, and the data module, which starts the
    next epoch afresh, lost the rest of it. The counters of the epoch in progress are zero here."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not loop or "epoch_loop.batch_progress" not in loop:
        return
    epochs, batches = loop["epoch_progress"]["total"], loop["epoch_loop.batch_progress"]
    epoch_closed = epochs["completed"] == epochs["processed"] == epochs["started"] == epochs["ready"]
    if epoch_closed and batches.get("is_last_batch"):
        batches["current"] = {key: 0 for key in batches["current"]}
        batches["is_last_batch"] = False


class PandaModule(L.LightningModule):
    """Trains a :class:`VideoLanguageModel` with the LM loss of one stage, plus distillation from a
    frozen ``teacher`` when one is given (docs/model-reference.md, "Distillation head").

    The teacher is deliberately kept out of the module tree: it is not saved in checkpoints, gets no
    optimiser state, and is never wrapped or sharded by a strategy; it follows the module's device.
    Throughput, learning rates, the loss history and the FSDP audit are callbacks
    (panda/training/callbacks.py).
    """

    def __init__(self, model: VideoLanguageModel, cfg: TrainConfig, derived: Derived, teacher=None):
        super().__init__()
        self.model = model
        object.__setattr__(self, "teacher", teacher)
        # the config and the derived values travel inside every checkpoint (panda.loading rebuilds from them)
        self.save_hyperparameters({"cfg": to_plain(cfg), "derived": dataclasses.asdict(derived)})
        self.cfg = cfg
        self.derived = derived
        self.sharded = False
        self.compiled = False
        self.trainable = apply_stage(model, cfg.stage)
        self.skipped_samples = 0
        self.padded_fractions: list[float] = []  # per batch: padding share of the text tokens (length grouping cuts it)
        # per batch: padding share of all LLM positions (visual + text), 0-d tensors read once at the end
        self.padded_fractions_all: list[torch.Tensor] = []
        self.warned_unknown_tokens = False
        # skips optimiser steps with a non-finite loss or gradient norm (panda/training/nonfinite.py)
        max_nonfinite = cfg.trainer.max_nonfinite_steps
        self.nonfinite = NonFiniteGuard(max_nonfinite) if max_nonfinite > 0 else None

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict):
        teacher = None
        if self.teacher is not None and self.model.distill_head is not None:
            if "teacher_pixels" not in batch:
                raise ValueError("distillation is on but the batch has no teacher_pixels (build the data module with_teacher=True)")
            teacher = self.teacher(batch["teacher_pixels"], batch["teacher_mask"])
        packing = self.cfg.data.packing and batch.get("labels") is not None
        return self.model(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"],
                          batch.get("labels"), teacher=teacher, frame_counts=batch.get("frame_counts"),
                          pack=packing, pack_length=self.cfg.data.pack_length, host=batch.get("host"))

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` shard the model with FSDP2 (panda/training/fsdp.py); then, with
        ``model.compile``, compile its parts (after sharding, as FSDP2 wants); each once."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not self.sharded and isinstance(self.trainer.strategy, ModelParallelStrategy):
            self._shard()
        if self.cfg.model.compile and not self.compiled:
            from panda.models.compiled import compile_model

            names = compile_model(self.model, self.cfg.model.compile_backend, self.cfg.model.compile_llm_layers)
            self.compiled = True
            rank_zero_info(f"torch.compile ({self.cfg.model.compile_backend}, dynamic shapes): {', '.join(names)}")

    def _shard(self) -> None:
        from panda.training.fsdp import broadcasts_initial_state, capture_initial_state, receive_initial_state, shard_model

        fsdp_cfg = self.cfg.trainer.fsdp
        mesh = self.device_mesh["data_parallel"]
        if fsdp_cfg.hybrid_shard and self.trainer.num_nodes > 1:
            from torch.distributed.device_mesh import init_device_mesh

            per_node = self.trainer.world_size // self.trainer.num_nodes
            mesh = init_device_mesh(self.device.type, (self.trainer.num_nodes, per_node), mesh_dim_names=("replicate", "shard"))
        broadcast = broadcasts_initial_state(self.cfg)  # rank 0 built the model, the others its structure only
        full = capture_initial_state(self.model) if broadcast and self.global_rank == 0 else None
        units = shard_model(self.model, mesh, fsdp_cfg)
        if broadcast:
            receive_initial_state(self.model, full, self.trainer.strategy.root_device)
            full = None  # rank 0's unsharded tensors go
        self.sharded = True
        rank_zero_info(f"FSDP2: {units} units, compute {fsdp_cfg.param_dtype or 'as stored'}, reduce {fsdp_cfg.reduce_dtype}, "
                       f"cpu_offload={fsdp_cfg.cpu_offload}, activation checkpointing={fsdp_cfg.activation_checkpointing}")

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        lines = [f"  {name:<10} trainable {n:>12,d}" for name, n in self.trainable.items()]
        rank_zero_info(f"stage {self.cfg.stage.name!r}:\n" + "\n".join(lines))
        if self.logger is not None:
            self.logger.log_hyperparams({f"trainable/{k}": v for k, v in self.trainable.items()} | self.model.parameter_counts())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning calls this before it restores its loops from the same dict
        start_after_finished_epoch(checkpoint)
        if self.nonfinite is not None:
            self.nonfinite.load_state_dict(checkpoint.get("nonfinite_steps", {}))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.nonfinite is not None:
            checkpoint["nonfinite_steps"] = self.nonfinite.state_dict()

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict, batch_idx: int):
        self.last_token_counts = None
        for miss in batch["skipped"]:
            self.skipped_samples += 1
            log.warning("skipped sample %s (%s): %s", miss["id"], miss["path"], miss["reason"])
        self.log("data/skipped", float(self.skipped_samples), on_step=True, on_epoch=False, batch_size=1)  # running total
        if self.nonfinite is not None:
            self.nonfinite.before_forward(self.model)
        if "input_ids" not in batch:
            # every sample of the batch failed: a zero loss through a real forward, so every trainable
            # parameter takes part in backward and the other ranks' gradient collectives do not hang
            loss = self(self.stand_in_batch()).loss * 0.0
            if self.nonfinite is not None:
                self.nonfinite.record(loss, [])
            return {"loss": loss}
        out = self(batch)
        if self.nonfinite is not None:
            self.nonfinite.record(out.loss, batch["ids"])
        n = batch["input_ids"].shape[0]
        self.padded_fractions.append(batch["padded_fraction"])
        self.log("data/padded_fraction", batch["padded_fraction"], on_step=True, on_epoch=False, batch_size=1)
        padded_all = out.padded_fraction_all  # visual + text positions as the LLM sees them
        if padded_all is not None:  # a tensor: Lightning reads it when it logs, not every batch
            self.padded_fractions_all.append(padded_all.detach())
            self.log("data/padded_fraction_all", padded_all.detach(), on_step=True, on_epoch=False, batch_size=1)
        if "unk_fraction" in batch:
            self.log("data/unk_fraction", batch["unk_fraction"], on_step=True, on_epoch=False, batch_size=1)
            if batch["unk_fraction"] > UNKNOWN_TOKENS_WARNING and not self.warned_unknown_tokens:
                self.warned_unknown_tokens = True
                log.warning(
                    "%.0f%% of this batch's text tokens are the tokenizer's unknown token (%s): it does not cover this "
                    "text. With real data train with the LLM's own tokenizer (llm=local llm.pretrained=PATH, or "
                    "llm.tokenizer=PATH); the synthetic default's tokenizer knows only the synthetic vocabulary.",
                    100 * batch["unk_fraction"], self.derived.tokenizer or "the run's tokenizer")
        self.log("train/lm_loss", out.lm_loss, on_step=True, on_epoch=False, batch_size=n)
        if out.distill_loss is not None:
            self.log("train/distill_loss", out.distill_loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss", out.loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        # what this micro-batch computed, for perf/tflops_per_device and perf/mfu (ThroughputMonitor)
        self.last_token_counts = (batch["attention_mask"].sum(1), out.visual_tokens,
                                  (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1), batch["pixels"].shape[1])
        # Lightning divides "loss" by the accumulation; the loss history (LossTracker) keeps this one
        return {"loss": out.loss, "loss_unscaled": out.loss.detach()}

    def stand_in_batch(self) -> dict:
        """One grey video (zeros after normalisation, every patch valid, so STAB, the projector, the
        LLM and the distillation head all run) with one supervised token: the path of a real batch,
        whose gradients are zero once its loss is multiplied by zero. (Batch-norm running statistics
        see it once; nothing else changes.)"""
        frames, stab = self.cfg.frames, self.model.stab_cfg
        ids = torch.tensor([[0] + [IMAGE_PLACEHOLDER_ID] * frames + [0, 0]], device=self.device)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, -1] = 0
        r = stab.resolution
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                 "pixels": torch.zeros(1, frames, 3, r, r, device=self.device),
                 "frame_mask": torch.ones(1, frames, r, r, device=self.device)}
        if self.teacher is not None:
            t = self.derived.teacher_image_size
            batch["teacher_pixels"] = torch.zeros(1, frames, 3, t, t, device=self.device)
            batch["teacher_mask"] = torch.ones(1, frames, t, t, device=self.device)
        return batch

    # ------------------------------------------------------------------ optimiser
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Lightning's step, with the non-finite step guard (``trainer.max_nonfinite_steps``): the
        closure (training step and backward of the step's last micro-batch) runs here; a step whose
        loss or gradient norm is non-finite on any rank is skipped on every rank (no
        ``optimizer.step()``: no weight, moment or step count changes; panda/training/nonfinite.py).
        The learning-rate schedule and ``global_step`` still advance."""
        guard = self.nonfinite
        if guard is None:
            optimizer.step(closure=optimizer_closure)
            return
        loss = optimizer_closure()
        if guard.should_skip(self, optimizer):
            guard.skip(self, optimizer)
        else:
            # clipping, on_before_optimizer_step and the update run as in Lightning's own step
            optimizer.step(closure=lambda: loss)
            guard.stepped()
        self.log("train/nonfinite_steps", float(guard.total), on_step=True, on_epoch=False, batch_size=1)  # running total

    def configure_optimizers(self):
        stage = self.cfg.stage
        vision_lr = stage.vision_lr if stage.vision_lr is not None else stage.lr
        groups: dict[str, dict] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            part = "llm" if name.startswith("llm.") else "vision"
            decay = not no_decay(name, param)
            key = f"{part}{'' if decay else '_no_decay'}"
            g = groups.setdefault(key, {"name": key, "params": [], "lr": stage.lr if part == "llm" else vision_lr,
                                        "weight_decay": stage.weight_decay if decay else 0.0})
            g["params"].append(param)
        optimizer = torch.optim.AdamW(list(groups.values()), betas=tuple(stage.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(stage.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, stage.schedule, stage.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
