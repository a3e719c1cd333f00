"""The non-finite step guard (``trainer.max_nonfinite_steps``): an optimiser step whose loss or
gradient norm is NaN or infinite is skipped on every rank alike, counted and reported; N such steps
in a row stop the run with a checkpoint of the last finite state.

One bad batch (an fp16/bf16 overflow, a corrupt sample that decodes to garbage) would otherwise
write NaN into every weight, and the next checkpoint would save them. :class:`NonFiniteGuard` is
driven by :meth:`panda.training.module.PandaModule.optimizer_step`: it runs Lightning's closure
(training step and backward), then asks :meth:`NonFiniteGuard.should_skip`, which combines the
step's losses and its gradient norm into one flag, reduces it over ranks and reads it once: one
device->host synchronisation per optimiser step, none per micro-batch. A skipped step updates no
weight and no optimiser state (no ``optimizer.step()`` at all: Adam's moments and step counts stay),
puts the batch-norm running statistics back as they were before the step's first micro-batch, and
drops the gradients. The step still counts: ``global_step``, the learning-rate schedule and the data
position move on as if it had been taken, so step numbers, the schedule and resuming stay aligned
with the data (the schedule does not stretch by the steps skipped).
"""

from __future__ import annotations

import logging

import torch

from panda.compat import is_batch_norm
from panda.errors import PandaError

log = logging.getLogger(__name__)

SHOWN_IDS = 8  # sample ids named per step in the stop message (every id is in the step's warning)


class NonFiniteStepsError(PandaError):
    """Too many optimiser steps in a row had a non-finite loss or gradient norm."""


def describe(samples: dict[int | None, list], limit: int | None = None) -> str:
    """``a, b`` (one process) or ``rank 1: a, b; rank 3: c``, at most ``limit`` ids in all."""
    parts, left = [], limit
    for rank, ids in samples.items():
        shown = ids if left is None else ids[:left]
        if not shown:
            continue
        parts.append(("" if rank is None else f"rank {rank}: ") + ", ".join(map(str, shown)))
        left = None if left is None else left - len(shown)
    more = sum(len(ids) for ids in samples.values()) - (limit if limit is not None else 0)
    text = "; ".join(parts) or "none"
    return text + (f" and {more} more" if limit is not None and more > 0 else "")


class NonFiniteGuard:
    """State and decisions of the guard for one module (see the module docstring).

    ``max_in_a_row``: that many skipped steps in a row stop the run (``trainer.max_nonfinite_steps``,
    > 0). ``total`` (all skipped steps of the run, kept in checkpoints) is logged as
    ``train/nonfinite_steps``; ``stopped`` is set when the run must stop, ``bad_steps`` describes the
    skipped steps in a row for the stop message."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0
        self.bad_steps: list[dict] = []  # the current run of skipped steps: step, what, samples
        self.stopped = False
        self._losses: list[torch.Tensor] = []  # this optimiser step's micro-batch losses (device, unread)
        self._ids: list[list] = []  # and their sample ids (host)
        self._norm_state: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, its copy before the step)

    # ------------------------------------------------------------------ per micro-batch (no reads)
    def before_forward(self, model: torch.nn.Module) -> None:
        """Before a micro-batch's forward; on the step's first, a copy of the batch-norm running
        statistics (a forward in training mode updates them, also with a non-finite batch)."""
        if not self._losses:
            self._norm_state = [(b, b.detach().clone()) for m in model.modules() if is_batch_norm(m)
                                for b in m.buffers()]

    def record(self, loss: torch.Tensor, ids: list) -> None:
        """A micro-batch's loss (kept on the device, not read) and sample ids."""
        self._losses.append(loss.detach())
        self._ids.append(list(ids))

    # ------------------------------------------------------------------ per optimiser step
    def local_flag(self, module, optimizer) -> torch.Tensor:
        """1.0 when this rank's losses of the step or its gradient norm are non-finite, else 0.0 (a
        device tensor, not read). Under FSDP the norm is that of this rank's shards: non-finite
        exactly when the full gradient's is. With a gradient scaler (``16-mixed``) only the loss
        counts: inf gradients of an over-scaled loss are the scaler's business (it skips that step
        and lowers the scale itself)."""
        device = module.device
        ok = torch.ones((), dtype=torch.bool, device=device)
        if self._losses:
            ok = ok & torch.isfinite(torch.stack([loss.float() for loss in self._losses]).sum()).to(device)
        if getattr(module.trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            if grads:
                ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)).to(device)
        return (~ok).float()

    def should_skip(self, module, optimizer) -> bool:
        """Whether the step about to be taken must be skipped: the flag of every rank, reduced (a
        non-finite step anywhere is skipped everywhere, so the ranks stay in lock-step), and read
        once — the guard's one synchronisation per optimiser step."""
        flag = self.local_flag(module, optimizer)
        if module.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    def skip(self, module, optimizer) -> None:
        """Drop the step: no optimiser update, gradients freed, batch-norm statistics as before the
        step; count it, warn naming its samples, and ask the trainer to stop after
        ``max_in_a_row`` in a row."""
        trainer = module.trainer
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in self._norm_state:
                buffer.copy_(saved)
        step = trainer.global_step + 1  # the step that was not taken (LossTracker's numbering)
        what, samples = self._culprits(trainer)
        self.total += 1
        self.in_a_row += 1
        self.bad_steps.append({"step": step, "what": what, "samples": samples})
        if trainer.is_global_zero:
            log.warning("non-finite %s at step %d (samples %s): optimiser step skipped on every rank (%d in a row, %d in "
                        "this run; trainer.max_nonfinite_steps=%d in a row stop the run)", what, step,
                        describe(samples), self.in_a_row, self.total, self.max_in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            self.stopped = True
            trainer.should_stop = True  # every rank decides alike: the flag was reduced
        self._clear()

    def stepped(self) -> None:
        """The step was taken: the count in a row starts again."""
        self.in_a_row = 0
        self.bad_steps = []
        self._clear()

    def _clear(self) -> None:
        self._losses, self._ids, self._norm_state = [], [], []

    def _culprits(self, trainer) -> tuple[str, dict[int | None, list]]:
        """What was non-finite, and the sample ids to look at, by rank (None: one process): those of
        the micro-batches whose loss was non-finite, else (the losses were finite, the gradient norm
        was not) every sample of the step. On a skipped step only: one more read and, with several
        ranks, a gather."""
        finite = torch.isfinite(torch.stack([loss.float() for loss in self._losses])).tolist() if self._losses else []
        entries = [(None, ids, ok) for ids, ok in zip(self._ids, finite)]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, [(trainer.global_rank, ids, ok) for _, ids, ok in entries])
            entries = [entry for rank_entries in gathered for entry in rank_entries]
        what = "loss" if not all(ok for _, _, ok in entries) else "gradient norm"
        samples: dict[int | None, list] = {}
        for rank, ids, ok in entries:
            if what == "gradient norm" or not ok:
                samples.setdefault(rank, []).extend(ids)
        return what, samples

    # ------------------------------------------------------------------ reporting
    def stop_message(self, checkpoint: str | None, lr: float | None, precision: str) -> str:
        """One line: the skipped steps and their samples, where the last finite state is, what to try."""
        steps = []
        for bad in self.bad_steps:
            steps.append(f"step {bad['step']} ({bad['what']}; samples {describe(bad['samples'], SHOWN_IDS)})")
        last_good = self.bad_steps[0]["step"] - 1 if self.bad_steps else None
        state = "the initial weights" if last_good == 0 else f"those after step {last_good}"
        saved = f"{checkpoint} holds the last finite weights ({state})" if checkpoint else "no checkpoint was saved"
        full = str(precision) in ("32-true", "32", "64-true", "64")
        return (f"{len(self.bad_steps)} optimiser steps in a row had a non-finite loss or gradient norm and were skipped "
                f"(trainer.max_nonfinite_steps={self.max_in_a_row}): {'; '.join(steps)}. Stopped; {saved}. Check the "
                f"samples listed (every skipped step's warning names them all), lower the learning rate (stage.lr"
                f"{f'={lr:g}' if lr is not None else ''})"
                + ("; trainer.precision is 32-true already" if full else
                   f", or train at trainer.precision=32-true (now {precision}; fp16/bf16 overflow)"))

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("total", 0))  # a resumed run gets a fresh count in a row
