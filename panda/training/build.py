"""Build the model, tokenizer and loggers of a run from its (resolved) config."""

from __future__ import annotations

import logging
import os

import torch

from panda.data.conversation import IMAGE_TOKEN
from panda.data.tokenizer import load_tokenizer
from panda.models.checkpoints import (
    apply_eve_state,
    apply_release_state,
    empty_llm_from_config,
    load_llm_from_folder,
    read_weights,
)
from panda.models.distill import DistillConfig
from panda.models.stab import STABConfig
from panda.models.video_lm import VideoLanguageModel, build_llm

log = logging.getLogger(__name__)


FOLDER_INITS = ("eve", "release")  # inits whose folder also holds the LLM (and its tokenizer)


def init_of(cfg) -> dict:
    return cfg.get("init") or {"kind": "none", "path": None}


def distill_active(cfg) -> bool:
    """Distillation runs when a teacher is configured and the loss is not ``off``."""
    return cfg.get("teacher", {}).get("kind", "none") != "none" and cfg.get("distill", {}).get("loss", "off") != "off"


def tokenizer_path(cfg) -> str:
    """``llm.tokenizer``, else the pretrained LLM's folder, else the init folder, else the dataset's own."""
    init = init_of(cfg)
    from_init = init["path"] if init["kind"] in FOLDER_INITS else None
    return cfg["llm"]["tokenizer"] or cfg["llm"]["pretrained"] or from_init or os.path.join(cfg["data"]["root"], "tokenizer")


def build_tokenizer(cfg):
    return load_tokenizer(tokenizer_path(cfg))


def _text_vocab(tokenizer) -> int:
    """Embedding rows the text needs: the image placeholder never reaches the embedding table."""
    return max(i for t, i in tokenizer.get_vocab().items() if t != IMAGE_TOKEN) + 1


def build_model(cfg, tokenizer, initialise: bool = True) -> VideoLanguageModel:
    """The model ``cfg`` describes. With ``initialise`` its weights start where ``init`` says;
    without (a checkpoint's weights are loaded next) nothing is read from ``init.path``."""
    llm_cfg, init = cfg["llm"], init_of(cfg)
    state = None
    if init["kind"] in FOLDER_INITS and initialise:
        state = read_weights(init["path"])
        llm = load_llm_from_folder(init["path"], state, llm_cfg["dtype"], llm_cfg["attn_implementation"])
        if llm.get_input_embeddings().num_embeddings < _text_vocab(tokenizer):
            raise ValueError(f"the tokenizer ({tokenizer_path(cfg)}) has more tokens than the LLM in {init['path']}")
    elif llm_cfg.get("hf_config"):  # rebuilding a run whose LLM came from a folder: same architecture, no init
        from transformers import AutoConfig

        config = AutoConfig.for_model(**llm_cfg["hf_config"])
        config._attn_implementation = llm_cfg["attn_implementation"]
        llm = empty_llm_from_config(config, getattr(torch, llm_cfg["dtype"]))
    else:
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
    teacher_width = cfg["teacher"]["width"] if distill_active(cfg) else None
    distill = DistillConfig(**cfg["distill"]) if teacher_width else None
    model = VideoLanguageModel(STABConfig(**cfg["stab"]), llm, projector=cfg["model"]["projector"],
                               distill=distill, teacher_width=teacher_width)
    if initialise and init["kind"] == "release":
        apply_release_state(model, state, llm_keys=set(llm.state_dict()), source=init["path"])
    elif initialise and init["kind"] == "eve":
        apply_eve_state(model, state, source=init["path"])
    elif initialise and init["kind"] == "checkpoint":
        load_weights_from_ckpt(model, init["path"])
    if initialise and cfg["model"].get("gradient_checkpointing"):  # training only: recompute decoder layers in backward
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_weights_from_ckpt(model: VideoLanguageModel, path: str, ckpt: dict | None = None) -> None:
    """Weights of a panda Lightning checkpoint into ``model`` (optimizer state is not restored)."""
    if ckpt is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # Lightning checkpoints hold the config dict
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if model.distill_head is None and any(k.startswith("distill_head.") for k in state):
        log.info("%s: skipping its distillation head (this run has no teacher)", path)
        state = {k: v for k, v in state.items() if not k.startswith("distill_head.")}
    head_fresh = model.distill_head is not None and not any(k.startswith("distill_head.") for k in state)
    result = model.load_state_dict(state, strict=not head_fresh)
    if head_fresh:
        log.warning("%s has no distillation head; the head starts fresh", path)
    bad = [k for k in result.missing_keys if not k.startswith("distill_head.")] + list(result.unexpected_keys)
    if bad:
        raise KeyError(f"{path} does not match the model: {bad[:20]}")


def wandb_offline(offline: bool | None, run_dir: str) -> bool:
    """``logger.offline``, where None means offline unless an API key is configured."""
    if offline is not None:
        return offline
    offline = not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc")))
    if offline:
        log.info("wandb: no API key configured; logging offline (upload later with `wandb sync %s/wandb`)", run_dir)
    return offline


def build_logger(cfg, run_dir: str, parameter_counts: dict):
    kind = cfg["logger"]["kind"]
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(run_dir, name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    offline = wandb_offline(cfg["logger"]["offline"], run_dir)
    # one wandb run per panda run: a resumed (or requeued) job continues it instead of starting another
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    id_file = os.path.join(run_dir, "wandb_run_id")
    run_id = None
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    elif rank_zero_only.rank == 0:  # only rank 0 talks to wandb
        import secrets

        run_id = secrets.token_hex(6)  # wandb run ids: lower-case letters and digits
        with open(id_file, "w") as f:
            f.write(run_id)
    return WandbLogger(
        id=run_id,
        resume="allow",
        project=cfg["logger"]["project"],
        group=cfg["logger"]["group"],
        name=cfg["name"],
        tags=list(cfg["logger"]["tags"]),
        save_dir=run_dir,
        offline=offline,
        config=dict(cfg) | parameter_counts,
    )
