"""What a lab watches on the dashboard while a run trains: the gradient norm of every optimiser
step, a validation loss on a few held-out questions, and a table of held-out answers with their
frames every few hundred steps — written into the run folder (``samples/``) and, with
``logger=wandb``, logged there too."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from panda.data.conversation import ChatFormat, stop_token_ids, tokenize_prompt
from panda.data.datamodule import Collator
from panda.data.datasets import ConversationDataset, FramePipeline, find_video
from panda.training.callbacks import logs_after
from panda.data.records import QAItem, VideoRecord, place_video_token

log = logging.getLogger(__name__)


class GradNormLogger(Callback):
    """``optim/grad_norm``: the L2 norm of all gradients of one optimiser step, before clipping
    (sharded gradients are reduced to their global norm), on logging steps: logged as a tensor, so
    Lightning reads it when it writes the metrics."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not logs_after(trainer, trainer.global_step + 1):  # the step about to be taken
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the shards' contributions
            norm = norm.full_tensor()
        pl_module.log("optim/grad_norm", norm.detach(), on_step=True, on_epoch=False, batch_size=1)


def frames_strip(pixels: torch.Tensor, mask: torch.Tensor, mean, std) -> np.ndarray:
    """The frames of one video side by side as an RGB uint8 image (un-normalised, padding grey)."""
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    tiles = []
    for frame, valid in zip(pixels.float().cpu(), mask.float().cpu()):
        rgb = (frame * std_t + mean_t).clamp(0, 1) * valid + 0.5 * (1 - valid)
        tiles.append((rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return np.concatenate(tiles, axis=1)


class HeldOutMonitor(Callback):
    """Every ``every_n_steps`` optimiser steps: ``val/loss`` (and ``val/lm_loss``) of the first
    ``loss_items`` held-out questions with their reference answers (teacher-forced, the training
    loss), on every rank (sharded models need all ranks); then, on rank 0, greedy answers to the
    first ``table_items`` questions, saved as ``samples/step<N>.jsonl`` and one frame strip per
    video (``samples/step<N>_<k>.png``) in the run folder, and as a ``samples`` table in wandb."""

    def __init__(self, items: list[QAItem], video_dir: str, tokenizer, template: ChatFormat,
                 eval_template: ChatFormat, pipeline: FramePipeline, max_length: int,
                 visual_tokens_per_frame: int, every_n_steps: int, loss_items: int, table_items: int, out_dir: str,
                 batch_size: int = 8, max_new_tokens: int = 32):
        self.every = every_n_steps
        self.video_dir, self.tokenizer, self.eval_template, self.pipeline = video_dir, tokenizer, eval_template, pipeline
        self.out_dir, self.batch_size, self.max_new_tokens = out_dir, batch_size, max_new_tokens
        records = []
        for item in items[:loss_items]:
            path = find_video(video_dir, item.video)
            if path is not None:
                records.append(VideoRecord(item.question_id, path, [(place_video_token(item.question), item.answer)]))
        self.loss_set = ConversationDataset(records, "", tokenizer, template, pipeline, max_length, visual_tokens_per_frame)
        self.table_items = items[:table_items]
        self.collate = Collator(tokenizer.pad_token_id)
        self.last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every <= 0 or step == 0 or step % self.every or step == self.last_step:
            return
        self.last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                self.log_loss(trainer, pl_module, step)
                if trainer.is_global_zero and not getattr(pl_module, "sharded", False):
                    self.write_samples(trainer, pl_module, step)
        finally:
            pl_module.train(was_training)

    def log_loss(self, trainer, pl_module, step: int) -> None:
        total = lm_total = count = 0.0
        samples = [self.loss_set[i] for i in range(len(self.loss_set))]
        for start in range(0, len(samples), self.batch_size):
            batch = self.collate(samples[start:start + self.batch_size])
            if "input_ids" not in batch:
                continue
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = pl_module(batch)
            n = batch["input_ids"].shape[0]
            total, lm_total, count = total + float(out.loss) * n, lm_total + float(out.lm_loss) * n, count + n
        if count and trainer.is_global_zero:
            # straight to the loggers, once: a value logged through the module from a callback hook is
            # repeated at every later logging step until the epoch ends
            for lg in trainer.loggers:
                lg.log_metrics({"val/loss": total / count, "val/lm_loss": lm_total / count}, step=step)

    def write_samples(self, trainer, pl_module, step: int) -> None:
        from PIL import Image

        from panda.constants import CLIP_MEAN, CLIP_STD

        os.makedirs(self.out_dir, exist_ok=True)
        rows = []
        model = pl_module.model
        dtype = next(model.parameters()).dtype
        for k, item in enumerate(self.table_items):
            path = find_video(self.video_dir, item.video)
            if path is None:
                continue
            try:
                frames = self.pipeline(path)
            except Exception as exc:  # an unreadable held-out video: the table skips it, saying why
                log.warning("samples table: %s: %s", path, exc)
                continue
            ids = tokenize_prompt(self.tokenizer, self.eval_template, item.question, self.pipeline.frames)[None]
            ids = ids.to(pl_module.device)
            out = model.generate(ids, torch.ones_like(ids), frames["pixels"][None].to(pl_module.device, dtype),
                                 frames["frame_mask"][None].to(pl_module.device, dtype),
                                 max_new_tokens=self.max_new_tokens,
                                 eos_token_id=stop_token_ids(self.eval_template, self.tokenizer, model.llm),
                                 pad_token_id=self.tokenizer.pad_token_id)
            answer = self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
            image = os.path.join(self.out_dir, f"step{step:06d}_{k}.png")
            Image.fromarray(frames_strip(frames["pixels"], frames["frame_mask"], CLIP_MEAN, CLIP_STD)).save(image)
            rows.append({"step": step, "id": item.question_id, "video": path, "frames": os.path.basename(image),
                         "question": item.question, "answer": item.answer, "prediction": answer})
        with open(os.path.join(self.out_dir, f"step{step:06d}.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger" and rows:
                import wandb

                table = wandb.Table(columns=["step", "video", "frames", "question", "answer", "prediction"])
                for row in rows:
                    table.add_data(row["step"], row["video"], wandb.Image(os.path.join(self.out_dir, row["frames"])),
                                   row["question"], row["answer"], row["prediction"])
                lg.experiment.log({"samples": table}, step=step)
