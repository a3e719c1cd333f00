"""Greedy generation of answers, and the normalised exact match the offline judge grades with."""

from __future__ import annotations

import logging
import re
import string

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower().replace("</s>", " ")
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


@torch.no_grad()
def generate_answers(model, loader, tokenizer, max_new_tokens: int = 16, device=None, on_batch=None,
                     stop_ids=None) -> tuple[dict[str, str], list[dict]]:
    """Greedy answers for every question of ``loader``: ({question_id: text}, failures).

    ``on_batch(predictions, failures)`` is called after each batch with that batch's results (the
    evaluation writes them out as it goes, so an interrupted run loses at most one batch).
    ``stop_ids``: what ends an answer (the chat format's ``stop_token_ids``); default the tokenizer's EOS."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    predictions, failures = {}, []
    for batch in tqdm(loader, desc="generating answers", leave=False):
        failures += batch["skipped"]
        for miss in batch["skipped"]:
            log.warning("evaluation: no answer for %s (%s): %s", miss["id"], miss["path"], miss["reason"])
        new = {}
        if "input_ids" in batch:
            out = model.generate(
                batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["pixels"].to(device, dtype),
                batch["frame_mask"].to(device, dtype), max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id if stop_ids is None else stop_ids, pad_token_id=tokenizer.pad_token_id,
                frame_counts=batch.get("frame_counts"), host=batch.get("host"),
            )
            new = {qid: tokenizer.decode(ids, skip_special_tokens=True).strip() for qid, ids in zip(batch["ids"], out.tolist())}
            predictions.update(new)
        if on_batch is not None:
            on_batch(new, batch["skipped"])
    model.train(was_training)
    return predictions, failures


def encode_question(model, tokenizer, template, pipeline, video_path: str, question: str):
    """One question about one video as the model takes it: (ids (1, N), pixels, frame_mask), on
    the model's device and dtype, with the sample's own frame count under ``data.sampling``."""
    from panda.data.conversation import tokenize_prompt
    from panda.data.datasets import sample_frames

    param = next(model.parameters())
    frames = pipeline(video_path)
    ids = tokenize_prompt(tokenizer, template, question, sample_frames(pipeline, frames))[None].to(param.device)
    return (ids, frames["pixels"][None].to(param.device, param.dtype),
            frames["frame_mask"][None].to(param.device, param.dtype))


def sequence_logits(model, ids, pixels, frame_mask) -> torch.Tensor:
    """The LLM's logits (M, V) at every position of one unpadded (1, N) sequence with its video."""
    spliced = model.prepare_inputs(ids, torch.ones_like(ids), pixels, frame_mask)
    return model.llm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                     position_ids=spliced.position_ids, use_cache=False).logits[0]
