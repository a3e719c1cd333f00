"""Evaluate a checkpoint written by ``train.py`` on its held-out QA split (or another one)."""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from omegaconf import OmegaConf

from panda.data.datamodule import VideoDataModule
from panda.evaluation.qa import write_predictions
from panda.training.build import build_model, build_tokenizer, load_weights_from_ckpt
from panda.training.run import evaluate_qa, print_summary, run_dir_of

log = logging.getLogger(__name__)


def load_checkpoint(path: str):
    """(model, tokenizer, run config) from a Lightning checkpoint of :class:`PandaModule`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (pass checkpoint=.../checkpoints/last.ckpt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # Lightning checkpoints hold the config dict
    cfg = ckpt.get("hyper_parameters", {}).get("cfg")
    if cfg is None:
        raise ValueError(f"{path} has no panda config in hyper_parameters; was it written by train.py?")
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, initialise=False)
    load_weights_from_ckpt(model, path, ckpt)
    model.eval()
    return model, tokenizer, cfg


def evaluate(cfg) -> dict:
    start = time.time()
    model, tokenizer, run_cfg = load_checkpoint(cfg.checkpoint)
    if cfg.data is not None:
        run_cfg["data"] = OmegaConf.to_container(cfg.data, resolve=True)
    run_cfg["data"]["num_workers"] = cfg.num_workers
    if not run_cfg["data"].get("eval_qa"):
        raise ValueError("no evaluation split: set data.eval_qa (a folder with test_q.json, test_a.json, videos/)")
    datamodule = VideoDataModule(OmegaConf.create(run_cfg), tokenizer)
    metrics, rows = evaluate_qa(model, datamodule, tokenizer, cfg.max_new_tokens, batch_size=cfg.batch_size)
    run_dir = run_dir_of(cfg)
    os.makedirs(run_dir, exist_ok=True)
    write_predictions(os.path.join(run_dir, "predictions.jsonl"), rows)
    results = {"checkpoint": os.path.abspath(cfg.checkpoint), "frames": run_cfg["frames"], **metrics,
               "time/eval_s": round(time.time() - start, 2)}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_summary(results)
    return results
