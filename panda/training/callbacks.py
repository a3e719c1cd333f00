"""Lightning callbacks of a training run: checkpoints marked complete, the loss history, throughput,
learning rates, and under FSDP the batch-norm statistics sync and the sharding audit. The
LightningModule keeps only the step, the losses and the optimiser."""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import threading
import time

import torch
from lightning.pytorch.callbacks import Callback

from panda.compat import is_batch_norm, model_checkpoint_base
from panda.errors import PandaError
from panda.models.adapters import adapter_parameters

COMPLETE_MARKER = "complete.json"


def mark_complete(trainer, path: str, finished: bool = False) -> None:
    """Record ``path`` as the newest fully written checkpoint (after every rank finished writing).
    The marker names the file relative to its own folder, so a copied or moved run folder stays
    self-contained; ``finished``: the run reached its step or epoch limit."""
    trainer.strategy.barrier("checkpoint-written")
    if trainer.is_global_zero:
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, COMPLETE_MARKER + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"file": os.path.basename(path), "step": trainer.global_step, "epoch": trainer.current_epoch,
                       "finished": finished, "time": time.time()}, f)
        os.replace(tmp, os.path.join(folder, COMPLETE_MARKER))  # atomic: a reader sees the old or the new marker


def read_marker(checkpoints_dir: str) -> dict | None:
    """The completion marker of a checkpoints folder, with ``path`` resolved inside that folder
    (None when there is none or its checkpoint is gone)."""
    marker = os.path.join(checkpoints_dir, COMPLETE_MARKER)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        info = json.load(f)
    name = info.get("file") or os.path.basename(info["path"])  # markers written before relative names
    info["path"] = os.path.join(os.path.abspath(checkpoints_dir), name)
    return info if os.path.exists(info["path"]) else None


class MarkedCheckpoint(model_checkpoint_base()):
    """ModelCheckpoint that names each checkpoint complete only once it is fully on disk, so
    ``resume=auto`` never picks a checkpoint a killed job left half-written."""

    def checkpoint_written(self, trainer, filepath: str) -> None:
        mark_complete(trainer, filepath)


def logs_after(trainer, step: int) -> bool:
    """Whether Lightning sends the logged metrics to the loggers after optimiser step ``step`` (the
    ``global_step`` once it is taken): every ``trainer.log_every_n_steps``-th, and when stopping. What
    is only logged may be computed on these steps alone, where reading a device value costs one wait."""
    n = trainer.log_every_n_steps
    return bool(trainer.fast_dev_run) or trainer.should_stop or (n > 0 and step % n == 0)


class LossTracker(Callback):
    """The training loss of each optimiser step of this process: ``history`` holds (global step,
    loss) once per step, where the loss is the mean of the step's micro-batch losses as the module
    computed them (not Lightning's copy divided by ``accumulate_grad_batches``); ``final`` is the
    mean of the last ``window`` finite ones. The history travels in every checkpoint, so a resumed
    run's summary covers the whole run. Each step's loss stays a device tensor until the history is
    read (a checkpoint, the summary): no step waits for the device to hand it back."""

    def __init__(self, window: int = 10):
        self.window_size = window
        self._history: list[tuple[int, float]] = []
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, 0-d loss tensor), not read yet
        self._micro: list[torch.Tensor] = []
        self._step_seen = None

    @property
    def history(self) -> list[tuple[int, float]]:
        if self._pending:  # one read of every pending step's loss
            losses = torch.stack([loss for _, loss in self._pending]).tolist()
            self._history += [(step, loss) for (step, _), loss in zip(self._pending, losses)]
            self._pending = []
        return self._history

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self._history = [(int(step), float(loss)) for step, loss in state.get("history", [])]
        self._pending = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._step_seen is None:
            self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(outputs, dict) and "loss_unscaled" in outputs:
            self._micro.append(outputs["loss_unscaled"])
        if trainer.global_step != self._step_seen:  # the optimiser stepped at the end of this batch
            self._step_seen = trainer.global_step
            if self._micro:
                self._pending.append((trainer.global_step, torch.stack(self._micro).float().mean()))
            self._micro = []

    def _finite(self) -> list[float]:
        """The history's losses but the non-finite ones (steps the non-finite guard skipped keep theirs
        in ``history``, where they show what happened, and stay out of ``first`` and ``final``)."""
        return [loss for _, loss in self.history if math.isfinite(loss)]

    @property
    def first(self) -> float | None:
        losses = self._finite()
        return losses[0] if losses else None

    @property
    def final(self) -> float | None:
        last = self._finite()[-self.window_size:]
        return sum(last) / len(last) if last else None


class GracefulInterrupt(Callback):
    """Ctrl-C in a one-process run: finish the current optimiser step, then stop; the run saves a
    complete checkpoint and prints the command that resumes it. A second Ctrl-C aborts at once.
    Multi-process runs keep Lightning's handling (every rank would have to agree on the step to
    stop at); their newest periodic checkpoint is the one ``resume=auto`` takes."""

    def __init__(self):
        self.requested = False
        self.stopped = False
        self._previous = None
        self._last_step = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        print("\npanda: Ctrl-C: stopping after this optimiser step and saving a checkpoint (Ctrl-C again aborts)",
              flush=True)

    def on_fit_start(self, trainer, pl_module):
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stepped = trainer.global_step != self._last_step  # a step boundary: no half-accumulated gradients are lost
        self._last_step = trainer.global_step
        if self.requested and stepped:
            trainer.should_stop = True
            self.stopped = True

    def teardown(self, trainer, pl_module, stage):  # also after a crash: the caller gets its own handler back
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None


# what to change for each skip reason (the ``code`` of a skipped sample)
SKIP_FIXES = {
    "missing": "data.video_root (the folder the records' \"video\" paths are relative to, under data.root)",
    "too_long": "model.max_length (or shorter conversations)",
    "empty_file": "the data: re-download the empty files",
}


class SkippedDataError(PandaError):
    """Too many training samples were skipped for the run to mean anything."""


class SkippedSamplesGuard(Callback):
    """Stops a run whose skipped share of an epoch's samples passes ``data.max_skipped_fraction``
    (and always one in which a whole epoch was skipped): a run that trains on nothing, or on a
    fraction of its data, must not end with exit code 0 and a checkpoint.

    Counts come from the collator (``batch["skipped"]``, host-side lists: no device sync); they are
    checked on logging steps and at each epoch's end, summed over ranks there so every rank stops
    together. The message names the reason counts (per source in a mixture), an example file and
    the key to fix.

    Per source of the mixture (``sources``: the run's :class:`panda.data.mixture.MixtureSource` list)
    it also counts over the whole run, resumes included (the counts travel in checkpoints), the
    samples read and those skipped by reason, and logs on the logging steps ``data/source_share/NAME``
    (the source's share of the samples read so far in the run, skipped ones included) and
    ``data/skipped/NAME`` (its skipped samples so far). These count this process's batches: in a
    multi-rank run what is logged and summarised is rank 0's, as ``data/skipped`` is."""

    def __init__(self, max_fraction: float, every_n_steps: int, video_root: str | None = None, min_samples: int = 64,
                 sources: list | None = None):
        self.max_fraction, self.every_n_steps, self.video_root = max_fraction, max(1, every_n_steps), video_root
        self.min_samples = min_samples  # mid-epoch checks wait for this many samples (summed over ranks)
        self.sources = {s.name: s for s in sources or []}
        self.source_read: collections.Counter = collections.Counter()  # over the run: samples read per source
        self.source_skipped: dict[str, collections.Counter] = {}  # over the run: source -> reason -> skipped samples
        self._reset()

    def _reset(self) -> None:
        self.seen, self.skipped = 0, 0
        self.reasons: collections.Counter = collections.Counter()
        self.examples: dict[str, dict] = {}
        self.epoch_read: collections.Counter = collections.Counter()  # this epoch, per source
        self.epoch_skipped: dict[str, collections.Counter] = {}

    def state_dict(self) -> dict:
        return {"source_read": dict(self.source_read),
                "source_skipped": {name: dict(codes) for name, codes in self.source_skipped.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.source_read = collections.Counter(state.get("source_read", {}))
        self.source_skipped = {name: collections.Counter(codes) for name, codes in state.get("source_skipped", {}).items()}

    def on_train_epoch_start(self, trainer, pl_module):
        self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        misses = batch.get("skipped", []) if isinstance(batch, dict) else []
        self.seen += len(misses) + len(batch.get("ids", []))
        self.skipped += len(misses)
        for miss in misses:
            code = miss.get("code", "unusable_sample")
            self.reasons[code] += 1
            self.examples.setdefault(code, miss)
        if isinstance(batch, dict) and ("sources" in batch or any("source" in m for m in misses)):
            self._count_sources(trainer, pl_module, batch.get("sources", []), misses)
        if (batch_idx + 1) % self.every_n_steps == 0:
            self._check(trainer, pl_module, "step")

    def _count_sources(self, trainer, pl_module, kept: list[str], misses: list[dict]) -> None:
        for name in kept:
            self.source_read[name] += 1
            self.epoch_read[name] += 1
        for miss in misses:
            name, code = miss.get("source"), miss.get("code", "unusable_sample")
            self.source_read[name] += 1
            self.epoch_read[name] += 1
            self.source_skipped.setdefault(name, collections.Counter())[code] += 1
            self.epoch_skipped.setdefault(name, collections.Counter())[code] += 1
        if not logs_after(trainer, trainer.global_step):  # counted every batch, logged where Lightning writes
            return
        total = sum(self.source_read.values())
        for name in dict.fromkeys([*self.sources, *self.source_read]):  # every configured source from the first batch on
            pl_module.log(f"data/source_share/{name}", self.source_read[name] / max(1, total), on_step=True,
                          on_epoch=False, batch_size=1)
            pl_module.log(f"data/skipped/{name}", float(sum(self.source_skipped.get(name, {}).values())), on_step=True,
                          on_epoch=False, batch_size=1)

    def source_summary(self) -> dict:
        """The run's per-source counts as summary entries: ``data/source_samples/NAME``,
        ``data/source_share/NAME``, ``data/skipped/NAME`` and ``data/skipped/NAME/REASON``."""
        total = sum(self.source_read.values())
        out = {}
        for name in dict.fromkeys([*self.sources, *self.source_read]):
            skipped = self.source_skipped.get(name, collections.Counter())
            out[f"data/source_samples/{name}"] = self.source_read[name]
            out[f"data/source_share/{name}"] = round(self.source_read[name] / total, 6) if total else None
            out[f"data/skipped/{name}"] = sum(skipped.values())
            out |= {f"data/skipped/{name}/{code}": n for code, n in sorted(skipped.items())}
        return out

    def on_train_epoch_end(self, trainer, pl_module):  # also when a step limit ends the run inside an epoch
        self._check(trainer, pl_module, "epoch")

    def _check(self, trainer, pl_module, when: str) -> None:
        """``when``: ``step`` (a logging step: waits for ``min_samples``) or ``epoch`` (its end, or the
        run's: an epoch in which every sample was skipped always stops)."""
        seen, skipped = self.seen, self.skipped
        if trainer.world_size > 1:  # one small collective on a logging step: every rank decides alike
            counts = torch.tensor([seen, skipped], dtype=torch.float64, device=pl_module.device)  # NCCL: on the GPU
            seen, skipped = (int(n) for n in trainer.strategy.reduce(counts, reduce_op="sum").tolist())  # one read
        if not seen or not skipped:
            return
        everything = when == "epoch" and skipped == seen
        over = skipped / seen > self.max_fraction and (when == "epoch" or seen >= self.min_samples)
        if everything or over:
            raise SkippedDataError(self.message(trainer, seen, skipped, everything))

    def message(self, trainer, seen: int, skipped: int, everything: bool) -> str:
        reasons = ", ".join(f"{code} {n}" for code, n in self.reasons.most_common())
        limit = "every sample" if everything else f"more than data.max_skipped_fraction={self.max_fraction}"
        lines = [f"{skipped} of the {seen} training samples read in epoch {trainer.current_epoch} were skipped "
                 f"({reasons}{' on this rank' if trainer.world_size > 1 else ''}): {limit}; stopped without saving "
                 "a checkpoint"]
        if len(self.sources) > 1:
            by_source = []
            for name in self.sources:
                codes = self.epoch_skipped.get(name, collections.Counter())
                detail = f" ({', '.join(f'{code} {n}' for code, n in codes.most_common())})" if codes else ""
                by_source.append(f"{name} {sum(codes.values())} of {self.epoch_read[name]}{detail}")
            lines.append("skipped by source: " + "; ".join(by_source))
        for code, _ in self.reasons.most_common(3):
            example = self.examples[code]
            lines.append(f"{code}: e.g. {example['path']}: {example['reason']}")
            fix = SKIP_FIXES.get(code)
            source = self.sources.get(example.get("source"))
            if code == "missing" and source is not None and source.kind == "records":
                key = "data.video_root" if source.key == "data.train_records" else f"{source.key}.video_root"
                fix = (f"{key} (the folder the records' \"video\" paths are relative to, under data.root); it is now "
                       f"{os.path.abspath(source.video_root)}")
            elif code == "missing" and self.video_root:
                fix = f"{fix}; it is now {self.video_root}"
            lines.append(f"  fix: {fix}" if fix else "  fix: as the reason says (every skipped sample is logged as "
                                                        "'skipped sample ...')")
        if not everything:
            lines.append("to train on what is left anyway, raise data.max_skipped_fraction (1.0 stops only on a fully "
                         "skipped epoch)")
        return "\n  ".join(lines)


class ThroughputMonitor(Callback):
    """``perf/data_time_s`` (waiting for the loader, per batch), ``perf/samples_per_s`` and
    ``perf/text_tokens_per_s`` (one text token per frame placeholder); with ``flops`` (a
    :class:`panda.models.flops.BatchFlops`) also ``perf/tflops_per_device`` from the batches' real
    token counts, and ``perf/mfu`` against ``peak_tflops``.

    The rates are means over the optimiser steps since the previous logging step, timed between
    two points where the device has finished its queue: on a GPU the host only queues kernels, so a
    clock around one batch would time their launch, not their work. The counts are added up on the
    device as the batches pass and read, with one synchronisation, on logging steps only."""

    def __init__(self, flops=None, peak_tflops: float | None = None):
        self._last_end = None
        self.flops, self.peak_tflops = flops, peak_tflops
        self._since = None  # when the interval began (the device idle)
        self._samples = 0  # samples in the interval (host: batch shapes)
        self._totals: list[torch.Tensor] = []  # per batch: text tokens and (with flops) FLOPs, on the device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last_end is not None:
            pl_module.log("perf/data_time_s", now - self._last_end, on_step=True, on_epoch=False)
        if self._since is None:
            _wait_for_device(pl_module.device)
            self._since = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "input_ids" in batch:
            self._samples += batch["input_ids"].shape[0]
            text = batch["attention_mask"].sum().double()
            counts = getattr(pl_module, "last_token_counts", None)
            has_flops = self.flops is not None and counts is not None and counts[1] is not None
            self._totals.append(torch.stack([text, self.flops(*counts)]) if has_flops else text[None])
        if logs_after(trainer, trainer.global_step) and self._totals and self._since is not None:
            _wait_for_device(pl_module.device)  # the interval's work is done: now the clock is right
            seconds = max(time.perf_counter() - self._since, 1e-9)
            width = min(len(t) for t in self._totals)
            sums = torch.stack([t[:width] for t in self._totals]).sum(0).tolist()  # the one read
            pl_module.log("perf/samples_per_s", self._samples / seconds, on_step=True, on_epoch=False)
            pl_module.log("perf/text_tokens_per_s", sums[0] / seconds, on_step=True, on_epoch=False)
            if width > 1:
                tflops = sums[1] / seconds / 1e12
                pl_module.log("perf/tflops_per_device", tflops, on_step=True, on_epoch=False)
                if self.peak_tflops:
                    pl_module.log("perf/mfu", tflops / self.peak_tflops, on_step=True, on_epoch=False)
            self._samples, self._totals = 0, []
            self._since = time.perf_counter()
        self._last_end = time.perf_counter()


def _wait_for_device(device: torch.device) -> None:
    """Let an asynchronous device finish what is queued (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LearningRateLogger(Callback):
    """``lr/<group>`` of every optimiser parameter group (llm, vision, and their no-decay twins), on
    logging steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not logs_after(trainer, trainer.global_step):
            return
        for i, group in enumerate(trainer.optimizers[0].param_groups):
            pl_module.log(f"lr/{group.get('name', i)}", group["lr"], on_step=True, on_epoch=False)


def _sharded(pl_module) -> bool:
    return getattr(pl_module, "sharded", False)


class NormStatisticsSync(Callback):
    """FSDP does not synchronise buffers: average batch-norm running statistics over ranks after
    each optimiser step, so every rank (and every checkpoint) holds the same ones. One all-reduce of
    all of them together per optimiser step, not one per buffer per micro-batch (training itself
    normalises with each batch's own statistics; the running ones serve evaluation)."""

    def __init__(self):
        self._step_seen = None

    def on_train_start(self, trainer, pl_module):
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not _sharded(pl_module) or trainer.world_size < 2 or trainer.global_step == self._step_seen:
            return  # within an accumulation: the optimiser has not stepped
        self._step_seen = trainer.global_step
        import torch.distributed as dist

        buffers = [buf for module in pl_module.model.modules() if is_batch_norm(module) and module.running_mean is not None
                   for buf in (module.running_mean, module.running_var)]
        if not buffers:
            return
        flat = torch.cat([buf.flatten() for buf in buffers])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(trainer.world_size)
        for buf, mean in zip(buffers, flat.split([buf.numel() for buf in buffers])):
            buf.copy_(mean.view_as(buf))


class FSDPAudit(Callback):
    """Under FSDP, write ``fsdp_rank<r>.json`` at the end of training: this rank's share of the
    sharded parameters, weight checksums of each part before and after training, and whether any
    frozen parameter holds a gradient or optimiser state."""

    def __init__(self):
        self.digests_before: dict[str, float] = {}

    @staticmethod
    def _parts(model) -> dict[str, list]:
        """Parameters of each part; with LoRA the LLM's own weights (``llm``) and its adapters apart."""
        parts = {"stab": model.stab, "projector": model.projector, "llm": model.llm}
        if model.distill_head is not None:
            parts["distill_head"] = model.distill_head
        parts = {name: list(module.parameters()) for name, module in parts.items()}
        adapters = adapter_parameters(model.llm)
        if adapters:
            ids = {id(p) for p in adapters.values()}
            parts["llm"] = [p for p in parts["llm"] if id(p) not in ids]
            parts["llm_adapter"] = list(adapters.values())
        return parts

    def _digests(self, pl_module) -> dict[str, float]:
        """A checksum of each part's weights from the local shards, summed over ranks (collective:
        every rank calls it; no parameter is gathered)."""
        import torch.distributed as dist

        parts = self._parts(pl_module.model)
        local = torch.zeros(len(parts), dtype=torch.float64, device=pl_module.device)
        for i, params in enumerate(parts.values()):
            for p in params:
                shard = p.to_local() if hasattr(p, "to_local") else p
                local[i] += shard.detach().double().abs().sum()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local)
        return dict(zip(parts, local.tolist()))

    def on_fit_start(self, trainer, pl_module):
        if _sharded(pl_module):
            self.digests_before = self._digests(pl_module)

    def on_train_end(self, trainer, pl_module):
        if not _sharded(pl_module):
            return
        from torch.distributed.fsdp import FSDPModule

        from panda.models.llm_parts import decoder_layer_classes, decoder_layers, layer_class_name
        from panda.training.fsdp import unit_trainability

        model = pl_module.model
        params = list(model.parameters())
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        optimizer = trainer.optimizers[0]
        optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        state_params = {id(p) for p in optimizer.state}
        frozen = [p for p in params if not p.requires_grad]
        report = {
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "local_numel": local, "global_numel": sum(p.numel() for p in params),
            "digests_before": self.digests_before, "digests_after": self._digests(pl_module),
            "frozen_with_grad": sum(p.grad is not None for p in frozen),
            "units_mixing_frozen_and_trainable": [name for name, flags in unit_trainability(model) if len(flags) > 1],
            "decoder_unit_classes": sorted({layer_class_name(m, decoder_layer_classes(model.llm))
                                            for m in decoder_layers(model.llm) if isinstance(m, FSDPModule)}),
            "frozen_in_optimizer": sum(id(p) in optimizer_params or id(p) in state_params for p in frozen),
        }
        with open(os.path.join(trainer.default_root_dir, f"fsdp_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f, indent=2)
