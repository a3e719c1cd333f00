"""FSDP2 (``fully_shard``) for panda models, applied through Lightning's ``ModelParallelStrategy``.

Sharding units (docs/code-layout.md, "FSDP units"): one per LLM decoder layer, the input embedding (panda
calls it directly to splice visual tokens, so it needs its own hooks), the rest of the LLM (final
norm, LM head), and the vision side (STAB + projector + distillation head) grouped by whether
they train, so **frozen and trainable parameters never share a unit** (stage 1 freezes the LLM).
The exception is LoRA (``llm.adapter=lora``): a decoder layer's unit holds its frozen weights and
its trainable adapters together, which FSDP2 supports (it shards per parameter and reduce-scatters
only the gradients that exist). Decoder layers are found from the LLM's ``_no_split_modules``
(panda/models/llm_parts.py), whatever its family.
The teacher is not part of the module tree: it stays replicated and gradient-free.

Mixed precision keeps fp32 master weights and computes in ``param_dtype`` (bf16 by default) with
gradient reduction in ``reduce_dtype``; ``cpu_offload`` keeps sharded parameters, gradients and
optimiser state in host memory; ``hybrid_shard`` shards within a node and replicates across nodes.

Initial weights (``broadcast_from_rank0``, the default): rank 0 builds the model exactly as one
process would (reading ``init.path`` / ``llm.pretrained``, initialising fresh parts from the seeded
RNG); every other rank builds it on the meta device, reading nothing. After ``fully_shard``,
:func:`receive_initial_state` sends rank 0's full state dict tensor by tensor
(``set_model_state_dict(..., broadcast_from_rank0=True)``): each rank keeps only its shards. The
non-persistent buffers (RoPE ``inv_freq``), which no state dict holds, follow. The ranks' RNG
streams need nothing: Lightning reseeds every rank when it starts the process group, after the
build, so each continues exactly as if it had built the model itself.
"""

from __future__ import annotations

import itertools
import logging
from typing import Optional

import torch
from torch import nn

from panda.build import enable_activation_checkpointing
from panda.compat import is_batch_norm, non_persistent_buffer_names
from panda.config import FSDPConfig
from panda.models.llm_parts import decoder_layers, llm_tail

log = logging.getLogger(__name__)


def _dtype(name: Optional[str]):
    return getattr(torch, name) if name else None


def shard_model(model: nn.Module, mesh, cfg: FSDPConfig) -> int:
    """Apply ``fully_shard`` to ``model`` (a VideoLanguageModel) in place; returns the number of units."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype)),
        "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    }
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model.llm)
    units = 0
    for layer in decoder_layers(model.llm):
        fully_shard(layer, **kwargs)
        units += 1
    embed, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    if head is not None and head.weight is embed.weight:  # tied (Qwen2.5 up to 3B, GPT-2): one unit owns the tensor
        fully_shard([embed, head], **kwargs)
    else:
        fully_shard(embed, **kwargs)
    units += 1
    vision = [m for m in (model.stab, model.projector, getattr(model, "distill_head", None)) if m is not None]
    if cfg.param_dtype not in (None, "float32"):
        # batch norm (LSTE) keeps fp32 weights and running statistics: its own unit computes in fp32
        # and hands bf16 back to the layers around it
        bn_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=_dtype(cfg.reduce_dtype),
                                         output_dtype=_dtype(cfg.param_dtype))
        for module in vision:
            for sub in module.modules():
                if is_batch_norm(sub):
                    fully_shard(sub, **{**kwargs, "mp_policy": bn_policy})
                    units += 1
    groups: dict[bool, list[nn.Module]] = {}
    for module in vision:
        if module is None:
            continue
        flags = {p.requires_grad for p in module.parameters()}
        if len(flags) > 1:
            raise ValueError(f"{type(module).__name__} mixes frozen and trainable parameters; it cannot be one FSDP unit")
        groups.setdefault(flags.pop(), []).append(module)
    for modules in groups.values():
        fully_shard(modules if len(modules) > 1 else modules[0], **kwargs)
        units += 1
    # the final norm and the LM head as one unit with hooks of their own: the LM head runs at the
    # supervised positions only, called on the decoder's output, outside the LLM's own forward
    tail = llm_tail(model.llm)
    if tail:
        fully_shard(tail if len(tail) > 1 else tail[0], **kwargs)
        units += 1
    fully_shard(model.llm, **kwargs)  # anything else the LLM owns
    fully_shard(model, **kwargs)  # the root: owns nothing left, drives the lazy init
    return units + 2


def unit_trainability(model: nn.Module) -> list[tuple[str, set[bool]]]:
    """For each FSDP unit, the ``requires_grad`` values of the parameters it manages itself."""
    from torch.distributed.fsdp import FSDPModule

    units = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    owner: dict[int, str] = {}
    for name, m in sorted(units, key=lambda u: -len(u[0])):  # deepest unit first claims its parameters
        for p in m.parameters():
            owner.setdefault(id(p), name)
    flags: dict[str, set[bool]] = {name: set() for name, _ in units}
    for p in model.parameters():
        if id(p) in owner:
            flags[owner[id(p)]].add(p.requires_grad)
    return [(name or "<root>", f) for name, f in flags.items()]


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model on CPU; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def launch_rank_is_zero() -> bool:
    """Whether this process will be global rank 0, known before the Trainer or a process group
    exists: read from the launch environment the way Lightning picks it (torchrun, SLURM, LSF, MPI,
    else its own launcher's ``NODE_RANK``/``LOCAL_RANK``, unset in the process that starts the others)."""
    from lightning.fabric.plugins.environments import (LightningEnvironment, LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    for env_type in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env_type.detect():
            return env_type().global_rank() == 0
    env = LightningEnvironment()
    return env.node_rank() == 0 and env.local_rank() == 0


def broadcasts_initial_state(cfg) -> bool:
    """Whether rank 0 sends the initial weights to the other ranks (``trainer.fsdp.broadcast_from_rank0``
    on a multi-rank FSDP run). QLoRA quantises while it reads, so each of its ranks reads for itself."""
    from panda.training.trainer import world_size

    t = cfg.trainer
    return (str(t.strategy) == "fsdp" and t.fsdp.broadcast_from_rank0 and str(cfg.llm.adapter) != "qlora"
            and world_size(cfg) > 1)


def builds_on_meta(cfg) -> bool:
    """Whether this process builds its model on the meta device: every rank but 0 when rank 0 sends the
    initial weights (:func:`broadcasts_initial_state`)."""
    return broadcasts_initial_state(cfg) and not launch_rank_is_zero()


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def non_persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers no state dict holds (RoPE's ``inv_freq``), in the same order on every rank."""
    found = []
    for prefix, module in model.named_modules():
        own = dict(module.named_buffers(recurse=False))
        for name in non_persistent_buffer_names(module):
            buf = own.get(name)
            if buf is not None:
                found.append((f"{prefix}.{name}" if prefix else name, buf))
    return found


def capture_initial_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """On rank 0, before ``fully_shard``: its full state dict (references, no copy), which keeps the
    unsharded tensors alive until :func:`receive_initial_state` has sent them."""
    if is_meta(model):
        raise RuntimeError("rank 0 built its model on the meta device, so it has no initial weights to send: the "
                           "launch environment named another rank 0 than Lightning's process group "
                           "(set trainer.fsdp.broadcast_from_rank0=false to let every rank read them)")
    return dict(model.state_dict())


def receive_initial_state(model: nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """After ``fully_shard``, on every rank: rank 0's initial weights (``full``; None elsewhere) into each
    rank's shards, one tensor at a time, then rank 0's non-persistent buffers. A rank built on the meta
    device is first allocated (uninitialised) on ``device``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    if rank != 0 and is_meta(model):
        model.to_empty(device=device)
    set_model_state_dict(model, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for _, buf in non_persistent_buffers(model):
        dist.broadcast(buf, src=0)
