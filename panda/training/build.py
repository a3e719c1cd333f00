"""Build the model, tokenizer and loggers of a run from its (resolved) config."""

from __future__ import annotations

import logging
import os

from panda.data.tokenizer import load_tokenizer
from panda.models.stab import STABConfig
from panda.models.video_lm import VideoLanguageModel, build_llm

log = logging.getLogger(__name__)


def tokenizer_path(cfg) -> str:
    """``llm.tokenizer``, else the pretrained LLM's folder, else the dataset's own tokenizer."""
    return cfg["llm"]["tokenizer"] or cfg["llm"]["pretrained"] or os.path.join(cfg["data"]["root"], "tokenizer")


def build_tokenizer(cfg):
    return load_tokenizer(tokenizer_path(cfg))


def build_model(cfg, tokenizer) -> VideoLanguageModel:
    llm_cfg = cfg["llm"]
    llm = build_llm(
        len(tokenizer),
        pretrained=llm_cfg["pretrained"],
        hidden_size=llm_cfg["hidden_size"],
        layers=llm_cfg["layers"],
        heads=llm_cfg["heads"],
        kv_heads=llm_cfg["kv_heads"],
        intermediate_size=llm_cfg["intermediate_size"],
        max_position_embeddings=max(cfg["model"]["max_length"], 256),
        attn_implementation=llm_cfg["attn_implementation"],
        dtype=llm_cfg["dtype"],
        initializer_range=llm_cfg["initializer_range"],
    )
    return VideoLanguageModel(STABConfig(**cfg["stab"]), llm, projector=cfg["model"]["projector"])


def build_logger(cfg, run_dir: str, parameter_counts: dict):
    kind = cfg["logger"]["kind"]
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(run_dir, name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    offline = cfg["logger"]["offline"]
    if offline is None:
        offline = not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc")))
        if offline:
            log.info("wandb: no API key configured; logging offline (upload later with `wandb sync %s/wandb`)", run_dir)
    return WandbLogger(
        project=cfg["logger"]["project"],
        group=cfg["logger"]["group"],
        name=cfg["name"],
        tags=list(cfg["logger"]["tags"]),
        save_dir=run_dir,
        offline=offline,
        config=dict(cfg) | parameter_counts,
    )
