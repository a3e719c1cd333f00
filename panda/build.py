"""Config -> model and tokenizer, in one place: training, evaluation, chat and export all build
through here (:mod:`panda.loading`, which imports this module and never the other way round, adds
the weights of any checkpoint kind)."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from panda.config import FOLDER_INITS, Derived, TrainConfig, distill_active
from panda.constants import IMAGE_TOKEN
from panda.data.budget import sampling_rule
from panda.data.conversation import get_template
from panda.data.datamodule import VideoDataModule
from panda.data.datasets import FramePipeline
from panda.data.mixture import merged_sampling, mixture_sources
from panda.data.tokenizer import load_tokenizer
from panda.models.adapters import apply_adapter, quantization_config
from panda.models.checkpoints import (apply_eve_state, apply_release_state, empty_llm_from_config, empty_llm_from_folder,
                                     empty_llm_from_pretrained, load_llm_from_folder, load_weights_from_ckpt, read_weights,
                                     tie_if_tied)
from panda.models.video_lm import VideoLanguageModel, build_llm

log = logging.getLogger(__name__)


def tokenizer_path(cfg: TrainConfig, derived: Derived | None = None) -> str:
    """The run's own tokenizer copy, else ``llm.tokenizer``, else the pretrained LLM's folder, else
    the init folder, else the dataset's own (``DATA_ROOT/tokenizer``, the synthetic default)."""
    from_init = cfg.init.path if cfg.init.kind in FOLDER_INITS else None
    return ((derived.tokenizer if derived else None) or cfg.llm.tokenizer or cfg.llm.pretrained or from_init
            or os.path.join(cfg.data.root, "tokenizer"))


def build_tokenizer(cfg: TrainConfig, derived: Derived | None = None):
    return load_tokenizer(tokenizer_path(cfg, derived))


def text_vocab(tokenizer) -> int:
    """Embedding rows the text needs: the image placeholder never reaches the embedding table."""
    return max(i for t, i in tokenizer.get_vocab().items() if t != IMAGE_TOKEN) + 1


def max_sequence_length(cfg: TrainConfig) -> int:
    """The longest sequence the LLM sees: ``release`` cuts the text at ``model.max_length`` counting
    each frame as one position, so the visual tokens come on top; ``spans`` counts them within. A
    mixture's sources with frame sampling of their own count too (the longest of them all)."""
    def visual(frames: int, sampling) -> int:
        if str(sampling.sampling) == "fps":
            return sampling.max_frames * cfg.stab.max_tokens_per_frame()
        if str(sampling.sampling) == "budget":
            return sampling.max_visual_tokens
        return frames * (cfg.stab.max_tokens_per_frame() - 1)  # each frame's own position is within max_length

    if str(cfg.model.tokenization) != "release":
        return cfg.model.max_length
    longest = visual(cfg.frames, cfg.data)
    for src in mixture_sources(cfg.data):
        if src.overrides:
            o = dict(src.overrides)
            longest = max(longest, visual(o.get("frames", cfg.frames), merged_sampling(cfg.data, o)))
    return cfg.model.max_length + longest


def build_model(cfg: TrainConfig, tokenizer, derived: Derived = Derived(), initialise: bool = True,
                meta: bool = False) -> VideoLanguageModel:
    """The model ``cfg`` describes (with ``derived``'s teacher width and folder LLM architecture).
    With ``initialise`` its weights start where ``init`` says; without (a checkpoint's weights are
    loaded next) nothing is read from ``init.path``.

    ``meta``: the same model on the meta device, its structure only: no weight is read (of
    ``init.path`` and ``llm.pretrained`` only their ``config.json``) and none is initialised. An
    FSDP rank other than 0 builds this and receives rank 0's weights once sharded
    (:func:`panda.training.fsdp.receive_initial_state`)."""
    if meta and str(cfg.llm.adapter) == "qlora":
        raise ValueError("llm.adapter=qlora quantises the LLM while reading it: it cannot be built on the meta device")
    with torch.device("meta") if meta else contextlib.nullcontext():
        return _build_model(cfg, tokenizer, derived, initialise, read=not meta)


def _build_model(cfg: TrainConfig, tokenizer, derived: Derived, initialise: bool, read: bool) -> VideoLanguageModel:
    llm_cfg, init = cfg.llm, cfg.init
    state = None
    if init.kind in FOLDER_INITS and initialise:
        if read:
            state = read_weights(init.path)
            llm = load_llm_from_folder(init.path, state, llm_cfg.dtype, llm_cfg.attn_implementation)
        else:
            llm = tie_if_tied(empty_llm_from_folder(init.path, llm_cfg.dtype, llm_cfg.attn_implementation))
        if llm.get_input_embeddings().num_embeddings < text_vocab(tokenizer):
            raise ValueError(f"the tokenizer ({tokenizer_path(cfg, derived)}) has more tokens than the LLM in {init.path}")
    elif derived.llm_config:  # rebuilding a run whose LLM came from a folder: same architecture, no init
        from transformers import AutoConfig

        config = AutoConfig.for_model(**derived.llm_config | {"attn_implementation": llm_cfg.attn_implementation})
        llm = empty_llm_from_config(config, getattr(torch, llm_cfg.dtype))
    elif llm_cfg.pretrained and not read:
        llm = empty_llm_from_pretrained(llm_cfg.pretrained, len(tokenizer), llm_cfg.dtype, llm_cfg.attn_implementation)
    else:
        llm = build_llm(
            tokenizer,  # its size, and a built LLaMA's BOS/EOS/pad ids
            pretrained=llm_cfg.pretrained,
            hidden_size=llm_cfg.hidden_size,
            layers=llm_cfg.layers,
            heads=llm_cfg.heads,
            kv_heads=llm_cfg.kv_heads,
            intermediate_size=llm_cfg.intermediate_size,
            max_position_embeddings=max(max_sequence_length(cfg), 256),
            attn_implementation=llm_cfg.attn_implementation,
            dtype=llm_cfg.dtype,
            initializer_range=llm_cfg.initializer_range,
            quantization=quantization_config(llm_cfg.dtype) if str(llm_cfg.adapter) == "qlora" and initialise else None,
        )
    teacher_width = derived.teacher_width if distill_active(cfg) else None
    model = VideoLanguageModel(cfg.stab, llm, projector=cfg.model.projector,
                               distill=cfg.distill if teacher_width else None, teacher_width=teacher_width)
    if initialise and read and init.kind == "release":
        apply_release_state(model, state, llm_keys=set(llm.state_dict()), source=init.path)
    elif initialise and read and init.kind == "eve":
        apply_eve_state(model, state, source=init.path)
    elif initialise and read and init.kind == "checkpoint":
        load_weights_from_ckpt(model, init.path)
    del state  # the file's tensors: the model holds its own copy now
    if str(llm_cfg.adapter) != "none":  # after the init weights: adapters start at zero on top of them
        if str(llm_cfg.adapter) == "qlora" and init.kind in FOLDER_INITS:
            raise ValueError("llm.adapter=qlora quantises the LLM while loading it: give it as llm.pretrained=FOLDER, "
                             f"not through init.kind={init.kind} (export that folder's STAB with --trainable-only if needed)")
        n = apply_adapter(llm, llm_cfg)
        log.info("LoRA on the LLM: %s adapter parameters (rank %d) on %s", f"{n:,}", llm_cfg.lora.rank,
                 list(llm_cfg.lora.target_modules))
    if initialise and cfg.model.gradient_checkpointing:  # training only: recompute decoder layers in backward
        enable_activation_checkpointing(llm)
    return model


def enable_activation_checkpointing(llm) -> None:
    """Non-reentrant activation checkpointing of the LLM's decoder layers."""
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def frame_pipeline(cfg: TrainConfig, derived: Derived | None = None, with_teacher: bool = False) -> FramePipeline:
    """The one frame pipeline of a run: frames from ``cfg.frames``, geometry from ``cfg.stab``;
    ``with_teacher`` adds the teacher's copy of the frames at the loaded teacher's image and patch size."""
    teacher = {}
    if with_teacher:
        teacher = {"teacher_resolution": derived.teacher_image_size, "teacher_patch_size": derived.teacher_patch_size}
    return FramePipeline(frames=cfg.frames, resolution=cfg.stab.resolution, patch_size=cfg.stab.patch_size,
                         ratio=cfg.stab.ratio, sample_fps=cfg.data.sample_fps, backend=cfg.data.video_backend,
                         sampling=sampling_rule(cfg.data, cfg.stab, cfg.frames), **teacher)


def build_datamodule(cfg: TrainConfig, tokenizer, derived: Derived = Derived(), rejects_path: str | None = None) -> VideoDataModule:
    """The training DataModule of ``cfg`` (the teacher's frames too when distillation is on)."""
    return VideoDataModule(cfg.data, tokenizer, frame_pipeline(cfg, derived, with_teacher=distill_active(cfg)),
                           get_template(cfg.model.template, str(cfg.model.tokenization), tokenizer), cfg.model.max_length,
                           cfg.stab.max_tokens_per_frame(), cfg.seed, rejects_path)
