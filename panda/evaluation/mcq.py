"""Multiple-choice answers -> the option chosen (``benchmark`` kind ``mcq``).

The strict parser (:func:`panda.evaluation.benchmarks.parse_choice`) reads the generated answer;
where it names no option, the model decides by log-likelihood: the option letter it ranks highest
at the first position of its answer (one forward pass over the video and the prompt); with
``benchmark.<name>.loglikelihood=false`` such an answer chose no option and counts as wrong. Each
item's choice and the path that decided it go to ``<benchmark>/choices.jsonl``; a re-run reuses them.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from panda.data.datasets import find_video
from panda.errors import PandaError
from panda.evaluation.benchmarks import OPTION_LETTERS, MultipleChoiceBenchmark, parse_choice
from panda.evaluation.qa import encode_question, sequence_logits

log = logging.getLogger(__name__)


class AmbiguousOptionLetters(PandaError):
    """The tokenizer gives several option letters the same first token."""


def letter_token_ids(tokenizer, count: int, benchmark: str = "mcq") -> list[int]:
    """The token each option letter starts an answer with (``▁A`` for a SentencePiece LLaMA)."""
    ids = [tokenizer(OPTION_LETTERS[i], add_special_tokens=False)["input_ids"][0] for i in range(count)]
    if len(set(ids)) != count:
        raise AmbiguousOptionLetters(
            f"benchmark {benchmark}: the tokenizer maps the option letters {OPTION_LETTERS[:count]} to the tokens {ids}, "
            "so an answer the parser cannot read cannot be decided by the letter the model ranks highest. Evaluate a "
            "checkpoint whose tokenizer has the capital letters (an LLM's own, e.g. Vicuna's or Qwen's; the synthetic "
            f"default's has none), or set benchmark.{benchmark}.loglikelihood=false to count such answers as wrong")
    return ids


def check_letter_tokens(bench: MultipleChoiceBenchmark, tokenizer) -> None:
    """Before any answer is generated: the log-likelihood fallback can tell this benchmark's letters apart."""
    if bench.cfg.loglikelihood and bench.mcq:
        letter_token_ids(tokenizer, max(len(m.options) for m in bench.mcq), bench.cfg.name)


@torch.no_grad()
def rank_options(model, tokenizer, template, pipeline, video_path: str, prompt: str, count: int) -> int:
    """The option whose letter the model finds likeliest as the first token of its answer."""
    logits = sequence_logits(model, *encode_question(model, tokenizer, template, pipeline, video_path, prompt))[-1]
    return int(torch.argmax(logits[letter_token_ids(tokenizer, count)]))


def resolve_choices(bench: MultipleChoiceBenchmark, folder: str, rows: dict[str, dict], model, tokenizer, template,
                    pipeline) -> dict[str, dict]:
    """Every generated answer's choice (cached in ``choices.jsonl``); sets ``bench.choices``."""
    path = os.path.join(folder, "choices.jsonl")
    choices: dict[str, dict] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    choices[row["uid"]] = row
    was_training = model.training
    model.eval()
    with open(path, "a", encoding="utf-8") as f:
        for item, gen in zip(bench.mcq, bench.items):
            row = rows.get(item.uid)
            if row is None or "prediction" not in row:
                continue
            cached = choices.get(item.uid)
            if cached is not None and cached.get("prediction") == row["prediction"]:
                continue
            choice = parse_choice(row["prediction"], item.options)
            decided_by = "parser"
            if choice is None:
                video = find_video(bench.video_dir, item.video)
                if video is None:
                    continue
                if bench.cfg.loglikelihood:
                    choice = rank_options(model, tokenizer, template, pipeline, video, gen.question, len(item.options))
                    decided_by = "loglikelihood"
                else:  # benchmark.<name>.loglikelihood=false: an answer naming no option is wrong
                    decided_by = "none"
            choices[item.uid] = {"uid": item.uid, "choice": choice, "decided_by": decided_by,
                                 "prediction": row["prediction"]}
            f.write(json.dumps(choices[item.uid]) + "\n")
    model.train(was_training)
    bench.choices = choices
    return choices
