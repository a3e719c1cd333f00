"""What each STAB part provides, measured without the LLM: STAB + a light reader, per question kind.

The study of ``experiments/ablations_v2`` trains, for each ablation, a STAB of the run's config
(``stab.*``, ``frames``, the experiment's switches) from scratch together with a **reader**: one
learned query per question kind attends over all of a video's visual tokens (with a learned
embedding of each token's frame index, standing in for the LLM's positions) and a linear layer
names the answer. Trained with cross-entropy on the synthetic training questions, scored on the
held-out questions by question type — the same videos, the same frame sampling (decord, the
release's indices), resize/pad/mask and STAB as ``train.py``.

Why not the whole model: the tiny LLM reads motion out of STAB's tokens far more slowly than STAB
learns it (README of the study), so a 5-seed sweep of 14 variants with the LLM would compare runs
that all sit at chance on motion.

    python experiments/ablations_v2/probe.py experiment=ablation/no_lste seed=3 data.root=... trainer.max_steps=800

writes ``summary.json`` (``eval/accuracy``, ``eval/accuracy_<type>``, ``time/wall_s``,
``params/stab``, ``git_commit``) in the Hydra run folder, so ``panda.experiments.collect`` reads a
``--multirun`` of it exactly as it reads ``train.py`` sweeps.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from panda.constants import CLIP_MEAN, CLIP_STD
from panda.data.frames import preprocess_frames
from panda.data.synthetic import ANSWERS, QUESTIONS, generate
from panda.data.video import decode_video
from panda.models.stab import STAB, QueryAttentionPool, VisualTokens, count_parameters

log = logging.getLogger(__name__)

KIND_OF_QUESTION = {q: kind for kind, qs in QUESTIONS.items() for q in qs}


def question_kind(text: str) -> str:
    """The synthetic question kind of a question (the ``<video>`` placeholder and newlines removed)."""
    q = text.replace("<video>", "").strip()
    if q not in KIND_OF_QUESTION:
        raise ValueError(f"not a synthetic question: {text!r}")
    return KIND_OF_QUESTION[q]


# ------------------------------------------------------------------------------------ data
def _decode_all(paths: list[str], frames: int, resolution: int, patch: int, ratio: int, desc: str):
    """(N, F, 3, R, R) uint8 canvases and (N, F, R, R) bool masks, decoded and placed as train.py does.
    Stored as the uint8 image the normalised pixels come from (a quarter of the float memory)."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    canvases = torch.empty(len(paths), frames, 3, resolution, resolution, dtype=torch.uint8)
    masks = torch.empty(len(paths), frames, resolution, resolution, dtype=torch.bool)
    for i, path in enumerate(tqdm(paths, desc=desc, leave=False)):
        decoded = decode_video(path, frames)
        pixels, mask = preprocess_frames(decoded.frames, frames, resolution, patch, ratio)
        canvases[i] = ((pixels * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        masks[i] = mask > 0
    return canvases, masks


def _normalise(canvases: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(1, 1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 1, 3, 1, 1)
    return (canvases.float() / 255 - mean) / std


def load_split(root: str, frames: int, resolution: int, patch: int, ratio: int) -> dict:
    """Training questions and held-out questions of a synthetic data root, with their videos
    decoded once per geometry and cached under ``ROOT/probe_cache/`` (runs of a sweep share it)."""
    train_json = os.path.join(root, "train", "train_json", "synthetic_train.json")
    qa_dir = os.path.join(root, "eval", "Synthetic_Zero_Shot_QA")
    with open(train_json) as f:
        records = json.load(f)
    with open(os.path.join(qa_dir, "test_q.json")) as f:
        test_q = json.load(f)
    with open(os.path.join(qa_dir, "test_a.json")) as f:
        test_a = {a["question_id"]: a for a in json.load(f)}
    train_videos = sorted({r["video"] for r in records})
    test_videos = sorted({q["video_name"] for q in test_q})
    train_index = {v: i for i, v in enumerate(train_videos)}  # row of each video in the decoded tensors
    test_index = {v: i for i, v in enumerate(test_videos)}
    train = [(train_index[r["video"]], question_kind(h["value"]), g["value"])
             for r in records for h, g in zip(r["conversations"][::2], r["conversations"][1::2])]
    test = [(test_index[q["video_name"]], question_kind(q["question"]), test_a[q["question_id"]]["answer"],
             test_a[q["question_id"]]["type"]) for q in test_q]

    cache = os.path.join(root, "probe_cache", f"f{frames}_r{resolution}_p{patch}_x{ratio}.pt")
    if os.path.exists(cache):
        videos = torch.load(cache)
    else:
        videos = {
            "train": _decode_all([os.path.join(root, "train", v) for v in train_videos], frames, resolution, patch, ratio,
                                 "decode train videos"),
            "test": _decode_all([os.path.join(qa_dir, "videos", v + ".mp4") for v in test_videos], frames, resolution,
                                patch, ratio, "decode held-out videos"),
        }
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}"
        torch.save(videos, tmp)
        os.replace(tmp, cache)  # concurrent runs of a sweep: the last identical copy wins
    return {"train": train, "test": test, "videos": videos}


# ------------------------------------------------------------------------------------ model
def video_packing(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For STAB's packed tokens, from their (B, F) per-frame counts: the video of each token
    (total,), its index within that video (total,), and the tokens of each video (B,)."""
    per_video = lengths.sum(1)  # (B,)
    video_of = torch.repeat_interleave(torch.arange(len(per_video)), per_video)
    within = torch.arange(len(video_of)) - (per_video.cumsum(0) - per_video)[video_of]
    return video_of, within, per_video


class KindReader(nn.Module):
    """Per question kind, a learned query attends over a video's visual tokens and a linear layer
    scores that kind's answers. Each token gets learned embeddings of its frame's index and of its
    place in the frame's sequence (what the LLM's positions tell it: STAB's tokens carry no
    absolute position of their own)."""

    def __init__(self, width: int, heads: int, frames: int, kinds: list[str], tokens_per_frame: int):
        super().__init__()
        self.kinds = list(kinds)
        self.frame_embed = nn.Parameter(torch.randn(frames, width) * 0.02)
        self.place_embed = nn.Parameter(torch.randn(tokens_per_frame, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(len(kinds), width) * width**-0.5)
        self.pool = nn.ModuleList(QueryAttentionPool(width, heads) for _ in kinds)
        self.classify = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(ANSWERS[k]))) for k in kinds)

    def forward(self, visual: VisualTokens, kinds: list[str]) -> list[torch.Tensor]:
        """Answer logits, one (classes,) tensor per video of the batch, for the kind asked of it."""
        lengths = visual.lengths  # (B, F)
        batch, frames = lengths.shape
        video_of, within, per_video = video_packing(lengths)
        longest = int(per_video.max())
        frame_of = torch.repeat_interleave(torch.arange(frames).repeat(batch), lengths.flatten())  # (total,)
        flat = lengths.flatten()
        place = torch.arange(len(frame_of)) - torch.repeat_interleave(flat.cumsum(0) - flat, flat)  # index in its frame
        padded = visual.tokens.new_zeros(batch, longest, visual.tokens.shape[1])
        padded[video_of, within] = visual.tokens + self.frame_embed[frame_of] + self.place_embed[place]  # (B, Lmax, d)
        key_mask = torch.arange(longest)[None] < per_video[:, None]
        out = []
        for b, kind in enumerate(kinds):
            k = self.kinds.index(kind)
            pooled = self.pool[k](self.queries[k][None], padded[b : b + 1], key_mask[b : b + 1])  # (1, d)
            out.append(self.classify[k](pooled)[0])
        return out


def _loss_and_hits(stab, reader, canvases, masks, items):
    visual = stab(_normalise(canvases), masks.float())
    logits = reader(visual, [kind for _, kind, _ in items])
    targets = [ANSWERS[kind].index(answer) for _, kind, answer in items]
    loss = torch.stack([F.cross_entropy(l[None], torch.tensor([t])) for l, t in zip(logits, targets)]).mean()
    hits = [int(l.argmax()) == t for l, t in zip(logits, targets)]
    return loss, hits


def run_probe(cfg, run_dir: str, kinds: list[str] | None = None) -> dict:
    """Train STAB + reader as ``cfg`` (a TrainConfig) says and score the held-out questions (of
    ``kinds`` only, when given); writes and returns ``summary.json``."""
    from panda.runs import git_commit
    from panda.training.module import lr_lambda

    start = time.time()
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    root = cfg.data.root
    if cfg.data.synthetic is not None:
        root = generate(cfg.data.synthetic, root)
    stab_cfg = cfg.stab
    split = load_split(root, cfg.frames, stab_cfg.resolution, stab_cfg.patch_size, stab_cfg.ratio)
    if kinds:
        unknown = set(kinds) - {kind for _, kind, _ in split["train"]}
        if unknown:
            raise ValueError(f"{root} asks no {sorted(unknown)} questions")
        split["train"] = [t for t in split["train"] if t[1] in kinds]
        split["test"] = [t for t in split["test"] if t[1] in kinds]
    kinds = sorted({kind for _, kind, _ in split["train"]})
    torch.manual_seed(cfg.seed)
    stab = STAB(stab_cfg)
    reader = KindReader(stab_cfg.width, stab_cfg.heads, cfg.frames, kinds, stab_cfg.max_tokens_per_frame())
    params = list(stab.parameters()) + list(reader.parameters())
    optimiser = torch.optim.AdamW(params, lr=cfg.stage.lr, weight_decay=cfg.stage.weight_decay)
    steps = cfg.trainer.max_steps
    warmup = max(1, int(steps * cfg.stage.warmup_ratio))
    # linear warmup, cosine to min_lr_ratio: train.py's schedule
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_lambda(warmup, steps, "cosine", cfg.stage.min_lr_ratio))
    rng = np.random.default_rng(cfg.seed)
    train, videos = split["train"], split["videos"]
    batch = cfg.data.batch_size
    losses = []
    stab.train()
    for _ in tqdm(range(steps), desc="probe steps", disable=not cfg.trainer.enable_progress_bar):
        items = [train[i] for i in rng.integers(0, len(train), batch)]
        index = torch.tensor([v for v, _, _ in items])
        loss, _ = _loss_and_hits(stab, reader, videos["train"][0][index], videos["train"][1][index], items)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        lr_schedule.step()
        losses.append(loss.item())
    stab.eval()
    by_type: dict[str, list[bool]] = {}
    with torch.no_grad():
        test = split["test"]
        for s in range(0, len(test), cfg.data.eval_batch_size):
            chunk = test[s : s + cfg.data.eval_batch_size]
            index = torch.tensor([v for v, *_ in chunk])
            _, hits = _loss_and_hits(stab, reader, videos["test"][0][index], videos["test"][1][index],
                                     [(v, kind, answer) for v, kind, answer, _ in chunk])
            for (_, _, _, qtype), hit in zip(chunk, hits):
                by_type.setdefault(qtype, []).append(hit)
    every = [h for hs in by_type.values() for h in hs]
    summary = {"eval/accuracy": float(np.mean(every)), "eval/num_questions": len(every),
               **{f"eval/accuracy_{t}": float(np.mean(hs)) for t, hs in sorted(by_type.items())},
               "train/steps": steps, "train/loss_first": losses[0] if losses else None,
               "train/loss_final": float(np.mean(losses[-20:])) if losses else None,
               "params/stab": count_parameters(stab), "params/total": count_parameters(stab) + count_parameters(reader),
               "time/wall_s": round(time.time() - start, 2), "git_commit": git_commit(), "reader": "kind_query_pool"}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log.info("probe: %s", {k: v for k, v in summary.items() if k.startswith("eval/")})
    return summary
