"""Any checkpoint kind -> a ready model: a ``train.py`` ``.ckpt`` (one file, or the folder of a
sharded FSDP checkpoint), a folder panda exported (``run_dir/final``), or a Video-Panda release
folder. Evaluation, chat and export load through :func:`load_model`; training's
``init.kind=checkpoint`` through :func:`~panda.models.checkpoints.load_weights_from_ckpt`, which
:mod:`panda.build` calls. This module builds through :mod:`panda.build`, never the other way round."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from panda.config import Derived, TrainConfig, to_train_config
from panda.constants import RELEASE_EVAL_TEMPLATE, RELEASE_FRAMES
from panda.data.conversation import ChatFormat, get_template
from panda.data.tokenizer import load_tokenizer
from panda.models.checkpoints import (NotACheckpointError, load_release, load_weights_from_ckpt, read_lightning_checkpoint,
                                     read_meta)
from panda.models.video_lm import VideoLanguageModel

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class LoadedModel:
    """A model ready for generation, and what a caller needs to prompt it like its training run."""

    model: VideoLanguageModel
    tokenizer: object
    frames: int  # frames per video it was trained with (8 for the release)
    template: str  # training conversation template
    eval_template: str  # evaluation conversation template
    run_config: TrainConfig | None = None  # the training run's config (``.ckpt`` only)
    derived: Derived | None = None
    tokenization: str = "release"  # how prompts become ids (model.tokenization)

    @property
    def prompt_template(self) -> ChatFormat:
        """The evaluation template with the run's tokenization: how to prompt this model."""
        return get_template(self.eval_template, self.tokenization, self.tokenizer)


def read_checkpoint_meta(path: str) -> dict:
    """Everything of a ``train.py`` checkpoint but the tensors' data: step, epoch, config, loop and
    callback states (``meta.pt`` of a sharded checkpoint, or a single file memory-mapped)."""
    if os.path.isdir(path):
        meta_path = os.path.join(path, "meta.pt")
        if not os.path.exists(meta_path):
            raise NotACheckpointError(f"{path} is a folder but not a sharded train.py checkpoint (no meta.pt)")
        return torch.load(meta_path, map_location="cpu", weights_only=False)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


# keys that checkpoints written before the Derived split kept inside the config
_LEGACY_DERIVED = {("llm", "hf_config"): "llm_config"}


def run_config_of(ckpt: dict, path: str) -> tuple[TrainConfig, Derived]:
    """The typed run config and derived values stored in a ``train.py`` checkpoint."""
    hparams = ckpt.get("hyper_parameters", {})
    raw = hparams.get("cfg")
    if raw is None:
        raise ValueError(f"{path} has no panda config in hyper_parameters; was it written by train.py?")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    derived = dict(hparams.get("derived") or {})
    for (group, key), name in _LEGACY_DERIVED.items():
        if key in raw.get(group, {}):
            derived.setdefault(name, raw[group].pop(key))
    raw.pop("ckpt_path", None)  # checkpoints written before resume= took a path kept it beside resume
    if "derived" not in hparams and raw.get("teacher", {}).get("kind", "none") != "none":
        derived.setdefault("teacher_width", raw["teacher"].get("width"))
    return to_train_config(raw), Derived(**derived)


def load_checkpoint(path: str) -> LoadedModel:
    """A ``train.py`` checkpoint (file or sharded folder) -> its model, tokenizer and run config."""
    from panda.build import build_model, build_tokenizer

    ckpt = read_lightning_checkpoint(path)
    cfg, derived = run_config_of(ckpt, path)
    tokenizer = build_tokenizer(cfg, derived)
    model = build_model(cfg, tokenizer, derived, initialise=False)
    load_weights_from_ckpt(model, path, ckpt)
    model.eval()
    return LoadedModel(model, tokenizer, cfg.frames, cfg.model.template, cfg.model.eval_template, cfg, derived,
                       str(cfg.model.tokenization))


def load_model(path: str, dtype: str = "float32", attn: str = "sdpa") -> LoadedModel:
    """A release folder, a panda export folder, or a ``train.py`` ``.ckpt`` -> :class:`LoadedModel`."""
    if path.rstrip("/").endswith(".ckpt"):  # a train.py checkpoint (a file, or a sharded checkpoint's folder)
        loaded = load_checkpoint(path)
        loaded.model.to(getattr(torch, dtype))
        return loaded
    if not os.path.isdir(path):
        raise NotACheckpointError(f"{path}: not a checkpoint folder or .ckpt file")
    if os.path.exists(os.path.join(path, "checkpoints", "last.ckpt")):
        raise NotACheckpointError(f"{path} is a train.py run folder; pass its checkpoint, "
                                  f"{os.path.join(path, 'checkpoints', 'last.ckpt')}, or its export {os.path.join(path, 'final')}")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise NotACheckpointError(
            f"{path} is not a checkpoint folder (no config.json); pass a Video-Panda release folder, "
            "a panda export (run_dir/final) or a .ckpt"
        )
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise NotACheckpointError(f"{path} has no tokenizer files (tokenizer.json / tokenizer.model)")
    if is_hf_export(path):
        return load_hf_export(path, dtype, attn)
    model, _ = load_release(path, dtype=dtype, attn_implementation=attn)
    meta = read_meta(path)
    return LoadedModel(model, load_tokenizer(path), meta.get("frames") or RELEASE_FRAMES,
                       meta.get("template") or "vicuna_v1", meta.get("eval_template") or RELEASE_EVAL_TEMPLATE,
                       tokenization=meta.get("tokenization") or "release")


def is_hf_export(path: str) -> bool:
    """Whether ``path`` is a folder ``panda export --format hf`` wrote (its ``config.json`` model type)."""
    import json

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f).get("model_type") == "panda_video"


def load_hf_export(path: str, dtype: str = "float32", attn: str = "sdpa") -> LoadedModel:
    """A Hugging Face–native export, read with panda's own classes (:mod:`panda.hub`, the code the folder
    carries a copy of): its model, tokenizer and prompt settings (``processor_config.json``)."""
    from panda.hub.modeling import PandaVideoForCausalLM
    from panda.hub.processing import PandaVideoProcessor

    wrapped = PandaVideoForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn)
    processor = PandaVideoProcessor.from_pretrained(path)
    model = wrapped.model.eval()
    model.llm.generation_config = wrapped.generation_config  # the stop tokens the export recorded
    return LoadedModel(model, processor.tokenizer, processor.frames, processor.template_name, processor.template_name,
                       tokenization=processor.tokenization)
