"""The LightningModule: stages (what trains), optimiser groups, schedule, losses and logging."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from panda.models.video_lm import VideoLanguageModel

log = logging.getLogger(__name__)


def apply_stage(model: VideoLanguageModel, stage: dict) -> dict[str, int]:
    """Freeze/unfreeze STAB, projector and LLM for ``stage``; returns trainable parameters per module.
    The distillation head trains with STAB (it exists only to shape STAB's tokens)."""
    parts = {"stab": (model.stab, stage["train_stab"]), "projector": (model.projector, stage["train_projector"]),
             "llm": (model.llm, stage["train_llm"])}
    if model.distill_head is not None:
        parts["distill_head"] = (model.distill_head, stage["train_stab"])
    counts = {}
    for name, (module, trainable) in parts.items():
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


class PandaModule(L.LightningModule):
    """Trains a :class:`VideoLanguageModel` with the LM loss of one stage, plus distillation from a
    frozen ``teacher`` when one is given (stab.md §7).

    The teacher is deliberately kept out of the module tree: it is not saved in checkpoints, gets no
    optimiser state, and is never wrapped or sharded by a strategy; it follows the module's device.
    """

    def __init__(self, model: VideoLanguageModel, cfg: dict, teacher=None):
        super().__init__()
        self.model = model
        object.__setattr__(self, "teacher", teacher)
        self.save_hyperparameters({"cfg": cfg})  # the resolved config travels inside every checkpoint
        self.cfg = cfg
        self._sharded = False
        self._digests_before: dict[str, float] = {}
        self.stage_cfg = cfg["stage"]
        self.trainable = apply_stage(model, self.stage_cfg)
        self.skipped_samples = 0
        self.data_position: tuple[int, int] | None = None  # (data epoch, batch position) last trained
        self.padded_fractions: list[float] = []  # per batch: padding share of the text tokens (length grouping cuts it)
        self._batch_start = None
        self._last_batch_end = None

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict):
        teacher = None
        if self.teacher is not None and self.model.distill_head is not None:
            if "teacher_pixels" not in batch:
                raise ValueError("distillation is on but the batch has no teacher_pixels (build the data module with_teacher=True)")
            teacher = self.teacher(batch["teacher_pixels"], batch["teacher_mask"])
        return self.model(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"],
                          batch.get("labels"), teacher=teacher)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` shard the model with FSDP2 (panda/training/fsdp.py); once."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._sharded or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from panda.training.fsdp import FSDPConfig, shard_model

        fsdp_cfg = FSDPConfig(**self.cfg["trainer"]["fsdp"])
        mesh = self.device_mesh["data_parallel"]
        if fsdp_cfg.hybrid_shard and self.trainer.num_nodes > 1:
            from torch.distributed.device_mesh import init_device_mesh

            per_node = self.trainer.world_size // self.trainer.num_nodes
            mesh = init_device_mesh(self.device.type, (self.trainer.num_nodes, per_node), mesh_dim_names=("replicate", "shard"))
        units = shard_model(self.model, mesh, fsdp_cfg)
        self._sharded = True
        self._digests_before = self._part_digests()
        rank_zero_info(f"FSDP2: {units} units, compute {fsdp_cfg.param_dtype or 'as stored'}, reduce {fsdp_cfg.reduce_dtype}, "
                       f"cpu_offload={fsdp_cfg.cpu_offload}, activation checkpointing={fsdp_cfg.activation_checkpointing}")

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        lines = [f"  {name:<10} trainable {n:>12,d}" for name, n in self.trainable.items()]
        rank_zero_info(f"stage {self.stage_cfg['name']!r}:\n" + "\n".join(lines))
        if self.logger is not None:
            self.logger.log_hyperparams({f"trainable/{k}": v for k, v in self.trainable.items()} | self.model.parameter_counts())

    def on_train_batch_start(self, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self.log("perf/data_time_s", now - self._last_batch_end, on_step=True, on_epoch=False)
        self._batch_start = now

    def training_step(self, batch: dict, batch_idx: int):
        if "position" in batch:  # the data module saves it: a resumed run continues after this batch
            self.data_position = batch["position"]
        for miss in batch["skipped"]:
            self.skipped_samples += 1
            log.warning("skipped sample %s (%s): %s", miss["id"], miss["path"], miss["reason"])
        self.log("data/skipped", float(self.skipped_samples), on_step=True, on_epoch=False, batch_size=1)  # running total
        if "input_ids" not in batch:  # every sample of the batch failed: nothing to train on
            return None
        out = self(batch)
        loss = out.loss
        n = batch["input_ids"].shape[0]
        self.padded_fractions.append(batch["padded_fraction"])
        self.log("data/padded_fraction", batch["padded_fraction"], on_step=True, on_epoch=False, batch_size=1)
        self.log("train/lm_loss", out.lm_loss, on_step=True, on_epoch=False, batch_size=n)
        if out.distill_loss is not None:
            self.log("train/distill_loss", out.distill_loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self._tokens = int(batch["attention_mask"].sum())  # text tokens, one per frame placeholder
        self._samples = n
        return loss

    def _parts(self) -> dict:
        parts = {"stab": self.model.stab, "projector": self.model.projector, "llm": self.model.llm}
        if self.model.distill_head is not None:
            parts["distill_head"] = self.model.distill_head
        return parts

    def _part_digests(self) -> dict[str, float]:
        """A checksum of each part's weights from the local shards, summed over ranks (collective:
        every rank calls it; no parameter is gathered)."""
        import torch.distributed as dist

        names = list(self._parts())
        local = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        for i, module in enumerate(self._parts().values()):
            for p in module.parameters():
                shard = p.to_local() if hasattr(p, "to_local") else p
                local[i] += shard.detach().double().abs().sum()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local)
        return dict(zip(names, local.tolist()))

    def on_train_end(self) -> None:
        """Under FSDP, write ``fsdp_rank<r>.json``: this rank's share of the sharded parameters, the
        weight checksums before/after, and whether any frozen parameter holds a gradient or optimiser state."""
        if not self._sharded:
            return
        from panda.training.fsdp import unit_trainability

        params = list(self.model.parameters())
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        optimizer_params = {id(p) for group in self.trainer.optimizers[0].param_groups for p in group["params"]}
        state_params = {id(p) for p in self.trainer.optimizers[0].state}
        frozen = [p for p in params if not p.requires_grad]
        report = {
            "rank": self.global_rank, "world_size": self.trainer.world_size,
            "local_numel": local, "global_numel": sum(p.numel() for p in params),
            "digests_before": self._digests_before, "digests_after": self._part_digests(),
            "frozen_with_grad": sum(p.grad is not None for p in frozen),
            "units_mixing_frozen_and_trainable": [name for name, flags in unit_trainability(self.model) if len(flags) > 1],
            "frozen_in_optimizer": sum(id(p) in optimizer_params or id(p) in state_params for p in frozen),
        }
        with open(os.path.join(self.trainer.default_root_dir, f"fsdp_rank{self.global_rank}.json"), "w") as f:
            json.dump(report, f, indent=2)

    def _sync_norm_statistics(self) -> None:
        """FSDP does not synchronise buffers: average batch-norm running statistics over ranks after
        each step, so every rank (and every checkpoint) holds the same ones."""
        import torch.distributed as dist

        for module in self.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                for buf in (module.running_mean, module.running_var):
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(self.trainer.world_size)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._sharded and self.trainer.world_size > 1:
            self._sync_norm_statistics()
        now = time.perf_counter()
        if self._batch_start is not None and "input_ids" in batch:
            dt = max(now - self._batch_start, 1e-9)
            self.log("perf/samples_per_s", self._samples / dt, on_step=True, on_epoch=False)
            self.log("perf/text_tokens_per_s", self._tokens / dt, on_step=True, on_epoch=False)
        self._last_batch_end = now
        for i, group in enumerate(self.trainer.optimizers[0].param_groups):
            self.log(f"lr/{group.get('name', i)}", group["lr"], on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        stage = self.stage_cfg
        vision_lr = stage["vision_lr"] if stage["vision_lr"] is not None else stage["lr"]
        groups: dict[str, dict] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            part = "llm" if name.startswith("llm.") else "vision"
            decay = not no_decay(name, param)
            key = f"{part}{'' if decay else '_no_decay'}"
            g = groups.setdefault(key, {"name": key, "params": [], "lr": stage["lr"] if part == "llm" else vision_lr,
                                        "weight_decay": stage["weight_decay"] if decay else 0.0})
            g["params"].append(param)
        optimizer = torch.optim.AdamW(list(groups.values()), betas=tuple(stage["betas"]))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(stage["warmup_ratio"] * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, stage["schedule"], stage["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
