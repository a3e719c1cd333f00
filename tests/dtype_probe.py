"""Which dtypes a training run really used: a probe of forward hooks, an optimiser step hook and the
FSDP2 collectives, for the bf16 tests (tests/test_bf16.py).

In process: ``probe = DtypeProbe(); probe.attach(model)`` before training, ``probe.seen`` after.
As a script it runs train.py's command line with the probe attached to the model right after FSDP2
shards it, in every rank (Lightning starts the other ranks with this same script), and each rank
writes what it saw to ``$DTYPE_PROBE_OUT/rank<r>.json``::

    DTYPE_PROBE_OUT=DIR python tests/dtype_probe.py trainer=fsdp trainer.devices=2 ...
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DtypeProbe:
    """``seen[key]``: the set of dtype names observed for ``key`` in training forwards (a module in
    eval mode, as in generation and validation, is not recorded) and optimiser steps:

    - ``llm_weight`` / ``llm_output``: the LLM's linear layers, the weight they computed with and their output
    - ``stab_weight`` / ``stab_output``: STAB's linear and convolution layers, likewise
    - ``batch_norm_weight`` / ``batch_norm_input`` / ``batch_norm_output``: STAB's batch norms
    - ``lm_loss``, ``distill_loss``, ``loss``: the model's losses
    - ``param`` / ``grad``: what the optimiser stepped (the stored, master weights) and their gradients
    - ``all_gather`` / ``reduce_scatter``: FSDP2's parameter all-gathers and gradient reduce-scatters
    """

    def __init__(self):
        self.seen: dict[str, set[str]] = {}
        self.handles: list = []
        self._undo: list = []

    def _add(self, key: str, dtype) -> None:
        self.seen.setdefault(key, set()).add(_name(dtype))

    def _watch(self, module: nn.Module, prefix: str) -> None:
        def before(module, args):  # after FSDP2's own pre-hook: the weight it computes with (unsharded)
            if not module.training:
                return
            self._add(f"{prefix}_weight", module.weight.dtype)
            if prefix == "batch_norm":
                self._add("batch_norm_input", args[0].dtype)  # after FSDP2 cast it for its unit

        def after(module, args, output):
            if module.training:
                self._add(f"{prefix}_output", output.dtype)

        self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def attach(self, model: nn.Module) -> "DtypeProbe":
        from panda.compat import is_batch_norm

        matmul = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for module in model.llm.modules():
            if isinstance(module, nn.Linear):
                self._watch(module, "llm")
        for module in model.stab.modules():
            if isinstance(module, matmul):
                self._watch(module, "stab")
            elif is_batch_norm(module):
                self._watch(module, "batch_norm")

        def losses(module, args, output):
            for key in ("lm_loss", "distill_loss", "loss") if module.training else ():
                value = getattr(output, key, None)
                if isinstance(value, torch.Tensor):
                    self._add(key, value.dtype)

        self.handles.append(model.register_forward_hook(losses))

        def before_step(optimizer, args, kwargs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self._add("param", p.dtype)
                    if p.grad is not None:
                        self._add("grad", p.grad.dtype)

        self.handles.append(register_optimizer_step_pre_hook(before_step))
        self._wrap_collectives()
        return self

    def _wrap_collectives(self) -> None:
        import torch.distributed as dist

        for fn, key, arg in (("all_gather_single", "all_gather", "input"), ("reduce_scatter_single", "reduce_scatter", "input")):
            original = getattr(dist, fn, None)
            if original is None:
                continue

            def wrapped(*args, _original=original, _key=key, _arg=arg, **kwargs):
                tensor = kwargs.get(_arg, args[1] if len(args) > 1 else None)
                if isinstance(tensor, torch.Tensor):
                    self._add(_key, tensor.dtype)
                return _original(*args, **kwargs)

            setattr(dist, fn, wrapped)
            self._undo.append((dist, fn, original))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        for owner, fn, original in self._undo:
            setattr(owner, fn, original)
        self.handles, self._undo = [], []

    def as_json(self) -> dict[str, list[str]]:
        return {k: sorted(v) for k, v in self.seen.items()}


def _main() -> None:
    out = os.environ["DTYPE_PROBE_OUT"]
    os.makedirs(out, exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import panda.training.fsdp as fsdp

    probe = DtypeProbe()
    shard = fsdp.shard_model
    rank = {"rank": int(os.environ.get("LOCAL_RANK", 0))}

    def shard_and_probe(model, mesh, cfg):
        import torch.distributed as dist

        units = shard(model, mesh, cfg)
        probe.attach(model)
        rank["rank"] = dist.get_rank()
        return units

    fsdp.shard_model = shard_and_probe  # PandaModule._shard imports it at call time

    def write():
        with open(os.path.join(out, f"rank{rank['rank']}.json"), "w") as f:
            json.dump(probe.as_json(), f, indent=1)

    atexit.register(write)
    from panda.train import main

    main(sys.argv[1:], prog="dtype_probe.py")


if __name__ == "__main__":
    _main()
