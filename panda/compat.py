"""Every private API of panda's dependencies that panda uses, each behind one small function, in one
place. A private name (a leading underscore, a ``_internal`` module) can change in any release
within the versions pyproject.toml allows; only the ones with no public equivalent are here, and
the rest of panda goes through these functions. ``tests/test_compat.py`` checks each one against
the installed dependency and names the dependency and the private name when one is gone or
behaves differently.

Imports nothing of panda and no dependency at module level, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

# ---------------------------------------------------------------------------------------- Lightning


def load_distributed_checkpoint(folder: str) -> dict:
    """A sharded (``torch.distributed.checkpoint``) Lightning checkpoint folder as one full dict in
    memory, without a process group. Private: ``lightning.fabric.utilities.load._load_distributed_checkpoint``
    (what Lightning's own ``consolidate_checkpoint`` command runs; Lightning has no public function)."""
    from pathlib import Path

    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(Path(folder))


@functools.cache
def model_checkpoint_base() -> type:
    """Lightning's ``ModelCheckpoint`` with one more method, ``checkpoint_written(trainer, filepath)``,
    run on every rank once a checkpoint file (every-n-steps, top-k or last) is written. Private:
    ``ModelCheckpoint._save_checkpoint``, the one method through which the callback writes a file
    (its public ``on_save_checkpoint`` hook runs before the file is written)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class ModelCheckpointBase(ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            self.checkpoint_written(trainer, filepath)

        def checkpoint_written(self, trainer, filepath: str) -> None:
            """Runs on every rank once ``filepath`` is written."""

    return ModelCheckpointBase


@functools.cache
def csv_writer_base() -> type:
    """Lightning's CSV ``ExperimentWriter``, except that what to do with an existing ``metrics.csv``
    when the writer is made is its ``existing_metrics()`` (Lightning's own: warn and delete the
    file). Private: ``ExperimentWriter._check_log_dir_exists``, the method its ``__init__`` calls for
    that (after ``log_dir`` and ``metrics_file_path`` are set, before the folder is made)."""
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class CSVWriterBase(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            self.existing_metrics()

        def existing_metrics(self) -> None:
            super()._check_log_dir_exists()

    return CSVWriterBase


def set_logger_experiment(logger, make: Callable[[], Any]) -> None:
    """Give a Lightning logger the experiment (its writer) ``make()`` returns, unless it already made
    one; the logger's ``experiment``, ``save`` and ``finalize`` then use it. Private: the logger's
    ``_experiment`` attribute, where they look (Lightning makes its own writer there on first use)."""
    if logger._experiment is None:
        logger._experiment = make()


# -------------------------------------------------------------------------------------------- Hydra


def hydra_args_parser():
    """Hydra's own command-line parser (overrides, ``--multirun``, ``--config-dir``, ``--cfg`` ...).
    Private: ``hydra._internal.utils.get_args_parser`` (Hydra has no public one)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


# ------------------------------------------------------------------------------------- transformers


def model_from_config(model_class: type, config, dtype) -> Any:
    """A model of exactly ``model_class`` built from ``config`` with its weights in ``dtype`` (within
    the caller's ``no_init_weights`` context, left uninitialised). Private:
    ``PreTrainedModel._from_config``, what the public ``AutoModel*.from_config`` calls once it has
    chosen a class from the config's type."""
    return model_class._from_config(config, dtype=dtype)


def no_split_modules(model) -> set[str]:
    """Class names of the modules a Hugging Face model must keep whole on one device (its decoder
    layers). Private: the ``PreTrainedModel._no_split_modules`` attribute (what transformers and
    accelerate read for ``device_map``; no public accessor)."""
    return set(getattr(model, "_no_split_modules", None) or [])


def init_module_as_owner(model, module) -> None:
    """Initialise ``module`` (a submodule of the Hugging Face model ``model`` whose weights a checkpoint did
    not hold, or a non-persistent buffer) the way ``model``'s own class does. Private:
    ``PreTrainedModel._init_weights``, what ``from_pretrained`` calls per module (a model that wraps
    another, as an exported folder's wraps its LLM, hands the LLM's modules to the LLM's rule)."""
    model._init_weights(module)


# -------------------------------------------------------------------------------------------- torch


def is_batch_norm(module) -> bool:
    """Whether ``module`` is a batch norm of any kind (BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones, or a
    subclass). Private: ``torch.nn.modules.batchnorm._BatchNorm``, their common base."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(module, _BatchNorm)


def wrap_compiled_call(module, wrap: Callable[[Callable], Callable]) -> None:
    """After ``module.compile(...)``: the module's calls go to ``wrap(compiled)`` instead of its compiled
    call. Private: ``nn.Module._compiled_call_impl``, where ``nn.Module.compile`` installs
    ``torch.compile(module._call_impl)`` and ``nn.Module.__call__`` looks for it."""
    compiled = module._compiled_call_impl
    if compiled is None:
        raise RuntimeError(f"{type(module).__name__} is not compiled: call module.compile() first")
    module._compiled_call_impl = wrap(compiled)


def non_persistent_buffer_names(module) -> list[str]:
    """The names of ``module``'s own buffers registered with ``persistent=False`` (no state dict holds
    them: RoPE's ``inv_freq``), sorted. Private: ``nn.Module._non_persistent_buffers_set`` (torch has no
    public way to ask whether a buffer is persistent)."""
    return sorted(module._non_persistent_buffers_set)


@functools.cache
def dispatch_mode_base() -> type:
    """The base class of a mode that sees every aten operation below autograd (forward and
    backward). Private: ``torch.utils._python_dispatch.TorchDispatchMode``, where torch's own
    documentation points (torch has no public alias)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def no_duck_shape():
    """A context in which dynamo's symbolic shapes give two equal sizes their own symbols. Private:
    ``torch.fx.experimental._config.use_duck_shape`` (no public switch)."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one). Private:
    ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------- litdata


@contextlib.contextmanager
def litdata_without_pyarrow():
    """While it lasts, litdata's chunk writer sees no pyarrow, so it writes the classic chunk layout
    (an offset table and each item's bytes) and no Arrow footer. Private:
    ``litdata.streaming.item_loader._PYARROW_AVAILABLE``, the flag its ``append_arrow_row_footer`` reads
    (the writer has no option for it)."""
    from litdata.streaming import item_loader

    saved = item_loader._PYARROW_AVAILABLE
    item_loader._PYARROW_AVAILABLE = False
    try:
        yield
    finally:
        item_loader._PYARROW_AVAILABLE = saved


# ----------------------------------------------------------------------------------------- lmms-eval


def set_lmms_process(model, rank: int, world_size: int) -> None:
    """The process's rank and the world size of an lmms-eval model (its ``rank`` / ``world_size``).
    Private: ``lmms._rank`` / ``lmms._world_size``, which those read-only properties return and which
    lmms-eval's own models (and its evaluator) set."""
    model._rank = rank
    model._world_size = world_size
