"""Model FLOPs of a training sample, as ``torch.utils.flop_counter.FlopCounterMode`` counts them
(2 per multiply-add of every matmul and convolution; attention's two S x S products without causal
halving; elementwise work and activation recomputation not counted, as MFU is defined). Used by
``python -m panda.plan`` and by the per-step ``perf/mfu`` of a training run."""

from __future__ import annotations

import time

import torch

# dense bf16 peaks (TFLOP/s) by the name torch reports for the device
GPU_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0,
                   "B200": 2250.0}


def llm_linear_params(config) -> int:
    """Parameters of the LLM's matmuls that every token passes: each decoder linear and the LM head."""
    d, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = d * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) // config.num_attention_heads
    return L * (2 * d * d + 2 * d * kv + 3 * d * i) + d * config.vocab_size


def llm_forward_flops(config, tokens: int, sequence: int, samples: int, head_tokens: int | None = None) -> float:
    """Forward FLOPs of the LLM over ``samples`` sequences of ``sequence`` positions (``tokens`` in
    all); the LM head runs on ``head_tokens`` positions (default every one)."""
    head = config.hidden_size * config.vocab_size
    attention = 4 * config.num_hidden_layers * sequence * sequence * config.hidden_size * samples
    head_tokens = tokens if head_tokens is None else head_tokens
    return 2.0 * tokens * (llm_linear_params(config) - head) + 2.0 * head_tokens * head + attention


def teacher_forward_flops(teacher_cfg, frames: int) -> float:
    """The frozen ViT-style teacher (LanguageBind: plus its temporal attention projections) on ``frames`` frames."""
    t = teacher_cfg
    tokens = (t.image_size // t.patch_size) ** 2 + 1
    per_layer = 2 * tokens * (4 * t.width * t.width + 2 * t.width * t.intermediate_size) + 4 * tokens * tokens * t.width
    temporal = 2 * tokens * 4 * t.width * t.width
    return frames * t.layers * (per_layer + temporal)


def stab_cost(stab_cfg, frames: int) -> tuple[float, int, int]:
    """(forward FLOPs, bytes saved for backward, visual tokens) of STAB on one video of ``frames``
    square frames at its resolution, measured by running a throwaway STAB once in training mode:
    the saved bytes are every distinct storage autograd keeps, its weights aside."""
    from torch.utils.flop_counter import FlopCounterMode

    from panda.models.stab import STAB

    r = stab_cfg.resolution
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.random.fork_rng():  # init, pixels and dropout: the run's random stream stays as it was
        torch.manual_seed(0)
        stab = STAB(stab_cfg).train()
        weights = {t.untyped_storage().data_ptr() for t in [*stab.parameters(), *stab.buffers()]}
        pixels = torch.randn(1, frames, 3, r, r)
        # (with grad on: under no_grad the counter's module tracker fails on STAB)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as counter:
            out = stab(pixels, torch.ones(1, frames, r, r))
    return float(counter.get_total_flops()), sum(saved.values()), int(out.lengths.sum())


def stab_forward_flops(stab_cfg, frames: int) -> float:
    """STAB's forward FLOPs on one video of ``frames`` square frames (:func:`stab_cost`)."""
    return stab_cost(stab_cfg, frames)[0]


def measured_matmul_tflops(size: int = 1024, repeats: int = 8) -> float:
    """This machine's fp32 matmul rate (TFLOP/s): the peak an MFU on CPU is measured against."""
    with torch.random.fork_rng():  # the run's random stream stays as it was
        a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def device_peak_tflops() -> float | None:
    """The dense bf16 peak of the first CUDA device when its name is known, else None."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


class BatchFlops:
    """Model FLOPs of one training micro-batch from its real token counts: per sample ``S`` = text
    positions + visual tokens − frames (each placeholder becomes its frame's tokens); the LLM
    forward ``2·S·N_body + 2·n_supervised·N_head + 4·L·S²·D``, times 3 with a trained LLM (weight
    and input gradients), 2 when only STAB trains (input gradients flow through the frozen LLM);
    STAB and the projector (``2·N_projector`` per visual token) times 3 when they train; the frozen
    teacher once."""

    def __init__(self, model, stage, stab_per_frame: float, teacher_per_frame: float = 0.0):
        llm = model.llm
        head = llm.get_output_embeddings()
        embed = llm.get_input_embeddings()
        self.head_params = head.weight.numel() if head is not None else 0
        total = sum(p.numel() for p in llm.parameters())
        tied = head is not None and head.weight is embed.weight
        self.body_params = total - embed.weight.numel() - (0 if tied else self.head_params)
        self.layers, self.width = llm.config.num_hidden_layers, llm.config.hidden_size
        self.projector_params = sum(p.numel() for p in model.projector.parameters())  # per visual token
        self.stab_per_frame, self.teacher_per_frame = stab_per_frame, teacher_per_frame
        self.llm_factor = 3 if stage.train_llm else (2 if stage.train_stab else 1)
        self.stab_factor = 3 if stage.train_stab else 1

    def __call__(self, text: torch.Tensor, visual: torch.Tensor, supervised: torch.Tensor, frames: int) -> float:
        """``text``, ``visual``, ``supervised``: (B,) counts per sample. A 0-d tensor on their device:
        adding it up reads nothing back from an asynchronous device (panda/training/syncs.py)."""
        seq = (text + visual - frames).double()
        llm = (2 * seq * self.body_params + 2 * supervised.double() * self.head_params
               + 4 * self.layers * seq * seq * self.width)
        per_video = self.stab_factor * self.stab_per_frame * frames + self.teacher_per_frame * frames
        projector = self.stab_factor * 2.0 * visual.sum().double() * self.projector_params
        return self.llm_factor * llm.sum() + projector + per_video * len(text)
