"""Count what would make a GPU wait for the host: device→host synchronisations in a training step.

On an asynchronous device the host queues kernels and runs ahead; anything that needs a value the
device computed stalls it until the queue drains. This module counts those operations, on any
device (a CPU run counts what the same code would do on a GPU):

- reading a tensor's value on the host: ``.item()``, ``float()``/``int()``/``bool()`` of a tensor,
  ``torch.equal`` (``aten._local_scalar_dense``, ``aten.is_nonzero``, ``aten.equal``);
- data-dependent shapes: ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``;
- explicit copies to the host: ``.cpu()``, ``.tolist()``, ``.numpy()``, ``.item()`` of a tensor.

:class:`SyncAudit` is a Lightning callback that counts them from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, backward, optimiser step, logging) for each micro-batch and
records where each one was made (``file:line (function)``). ``trainer.audit_syncs=true`` adds it to
a run: ``syncs.json`` in the run directory and a table in the log; ``tests/test_syncs.py`` holds the count.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import traceback

import lightning as L
import torch

from panda.compat import dispatch_mode_base
from panda.training.callbacks import logs_after

log = logging.getLogger(__name__)

PANDA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# operations (by aten name) that read a value on the host
VALUE_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}
# operations whose output shape depends on the data
DATA_DEPENDENT = {"aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
                  "aten::_unique"}
# index operations that take a boolean mask (a data-dependent shape) when one of their indices is one
INDEXING = {"aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
HOST_COPIES = ("cpu", "tolist", "numpy", "item")


TORCH_DIR = os.path.dirname(torch.__file__)


def _site() -> str:
    """Where the synchronisation was asked for: the innermost frame outside torch itself, as
    ``panda/<module path>:line (function)`` for panda's own lines, else ``<library>/<module path>:line (function)``.
    Inside torch's optimisers it is ``torch/optim/...``: their step counts live on the host unless
    ``capturable``/``fused``, so reading them waits for nothing on a GPU."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if path.startswith(os.path.join(TORCH_DIR, "optim")):
            return f"torch/optim/{os.path.relpath(path, os.path.join(TORCH_DIR, 'optim'))}:{frame.lineno} ({frame.name})"
        if path.startswith(TORCH_DIR) or path == __file__:
            continue
        if path.startswith(PANDA_DIR):
            return f"{os.path.relpath(path, os.path.dirname(PANDA_DIR))}:{frame.lineno} ({frame.name})"
        parts = path.split(os.sep)
        where = parts.index("site-packages") + 1 if "site-packages" in parts else len(parts) - 2
        return f"{'/'.join(parts[where:])}:{frame.lineno} ({frame.name})"
    return "torch"


def _is_sync(func, args, kwargs) -> bool:
    name = func.name()
    if name in VALUE_READS or name in DATA_DEPENDENT:
        return True
    if name.startswith("aten::repeat_interleave"):
        return name != "aten::repeat_interleave.self_int" and kwargs.get("output_size") is None
    if name in INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype == torch.bool for i in indices)
    return False


class SyncCounter(dispatch_mode_base()):
    """Counts device→host synchronisations (see the module docstring) while active, by site."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()
        self._patched: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.sites[f"{func.name()} @ {_site()}"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in HOST_COPIES:  # explicit host copies: on a CPU tensor these dispatch nothing
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def counted(tensor, *a, _name=name, _original=original, **k):
                if not isinstance(tensor, torch.nn.Parameter):
                    self.sites[f"Tensor.{_name}() @ {_site()}"] += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


class SyncAudit(L.Callback):
    """Counts the synchronisations of each training micro-batch (``trainer.audit_syncs=true``) and
    writes them to ``path`` at the end of training: per micro-batch its optimiser step, whether
    metrics were logged after it, and the count by site; a table of the sites in the log."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.steps: list[dict] = []
        self._counter: SyncCounter | None = None
        self._step_at_start = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_at_start = trainer.global_step
        self._counter = SyncCounter()
        self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._counter is None:
            return
        self._counter.__exit__(None, None, None)
        step = trainer.global_step  # after this micro-batch (the optimiser stepped if it closed an accumulation)
        logging = step != self._step_at_start and logs_after(trainer, step)
        self.steps.append({"step": step, "logging": logging, "sites": dict(self._counter.sites)})
        self._counter = None

    def on_train_end(self, trainer, pl_module):
        if self._counter is not None:  # stopped inside a batch
            self._counter.__exit__(None, None, None)
            self._counter = None
        if not self.path:
            return
        path = self.path if trainer.global_rank == 0 else self.path.replace(".json", f"_rank{trainer.global_rank}.json")
        with open(path, "w") as f:  # rank 0: syncs.json; the others syncs_rank<r>.json
            json.dump({"micro_batches": self.steps, "summary": self.summary()}, f, indent=1)
        if trainer.global_rank == 0:
            log.info("device->host synchronisations per micro-batch (trainer.audit_syncs):\n%s", self.table())

    def summary(self) -> dict:
        """Micro-batches on logging and other steps, and each site's total count on each kind."""
        out = {"micro_batches": {"logging": 0, "other": 0}, "sites": {}}
        for entry in self.steps:
            kind = "logging" if entry["logging"] else "other"
            out["micro_batches"][kind] += 1
            for site, n in entry["sites"].items():
                out["sites"].setdefault(site, {"logging": 0, "other": 0})[kind] += n
        return out

    def table(self) -> str:
        summary = self.summary()
        per = summary["micro_batches"]
        lines = [f"{'per micro-batch':>15} {'logging':>8} {'other':>8}  site"]
        for site, n in sorted(summary["sites"].items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(f"{'':>15} {n['logging'] / max(1, per['logging']):>8.2f} {n['other'] / max(1, per['other']):>8.2f}  {site}")
        return "\n".join(lines)
