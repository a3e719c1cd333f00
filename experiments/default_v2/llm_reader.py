"""Is the tiny LLM or STAB the slow part of learning v2 motion? STAB trained with one of three
readers of its visual tokens, on the direction questions of a v2 data root, scored on its held-out
direction questions every 200 steps:

- ``llama``: the tiny LLaMA's layers (the default's sizes: hidden 64, 2 layers, 4 heads, MLP 256,
  init std ``--init``) behind the default's projector. A learned query token follows the video's
  visual tokens (left-padded), and a 4-way linear head reads the last position;
- ``kind``: the attention reader of the v2 study (``experiments/ablations_v2/stab_probe.py``);
- ``mean``: a linear head on the mean visual token.

STAB, frame decoding, sampling and preprocessing are the study's (``load_split``: decord, the
release's frame indices, resize/pad/mask). No text is involved, so what it isolates is the
reader's architecture and init.

    python experiments/default_v2/llm_reader.py --reader llama --init 0.02 --seed 0
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel

# the v2 study's probe (its reader, data loading and packing) lives with that study
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ablations_v2"))

from stab_probe import KindReader, _normalise, load_split, video_packing  # noqa: E402

from panda.data.synthetic import ANSWERS, SyntheticConfig, generate  # noqa: E402
from panda.models.stab import STAB, STABConfig, build_projector  # noqa: E402
from panda.training.module import lr_lambda  # noqa: E402

FRAMES = 4
CLASSES = ANSWERS["direction"]


class MeanReader(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(CLASSES)))

    def forward(self, visual):
        video_of, _, per_video = video_packing(visual.lengths)
        summed = visual.tokens.new_zeros(len(per_video), visual.tokens.shape[1]).index_add_(0, video_of, visual.tokens)
        return self.head(summed / per_video[:, None])


class LlamaReader(nn.Module):
    def __init__(self, width: int, init: float, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.projector = build_projector("mlp2x_gelu", width, hidden)
        self.llm = LlamaModel(LlamaConfig(vocab_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                          intermediate_size=4 * hidden, initializer_range=init, max_position_embeddings=4096))
        self.query = nn.Parameter(torch.randn(1, hidden) * init)
        self.head = nn.Linear(hidden, len(CLASSES), bias=False)
        nn.init.normal_(self.head.weight, std=init)

    def forward(self, visual):
        video_of, within, per_video = video_packing(visual.lengths)
        x = self.projector(visual.tokens)
        batch, longest = len(per_video), int(per_video.max())
        embeds = x.new_zeros(batch, longest + 1, x.shape[1])  # (B, L + 1, hidden): left-padded video, then the query
        shift = longest - per_video
        embeds[video_of, within + shift[video_of]] = x
        embeds[:, longest:] = self.query
        mask = (torch.arange(longest + 1)[None] >= shift[:, None]).long()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return self.head(self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reader", choices=["llama", "kind", "mean"], default="llama")
    parser.add_argument("--init", type=float, default=0.02, help="LLaMA init std (llama reader)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--root", default="data_cache/synthetic_v2_direction",
                        help="a v2 data root; generated (800 videos, direction questions) when missing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generate(SyntheticConfig(version=2, kinds=["direction"]), args.root)  # returns at once when made
    stab_cfg = STABConfig(width=64, heads=4, resolution=112, dropout=0.0)  # conf/stab/tiny.yaml
    split = load_split(args.root, FRAMES, 112, 14, 2)
    train = [t for t in split["train"] if t[1] == "direction"]
    test = [t for t in split["test"] if t[1] == "direction"]
    videos = split["videos"]
    torch.manual_seed(args.seed)
    stab = STAB(stab_cfg)
    if args.reader == "kind":
        kind_reader = KindReader(stab_cfg.width, 4, FRAMES, ["direction"], stab_cfg.max_tokens_per_frame())
        reader = kind_reader
        read = lambda visual: torch.stack(kind_reader(visual, ["direction"] * len(visual.lengths)))  # noqa: E731
    else:
        reader = MeanReader(stab_cfg.width) if args.reader == "mean" else LlamaReader(stab_cfg.width, args.init)
        read = reader
    params = list(stab.parameters()) + list(reader.parameters())
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, int(args.steps * 0.03))  # the scratch stage's schedule: 3% warmup, cosine to 0.1
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_lambda(warmup, args.steps, "cosine", 0.1))
    rng = np.random.default_rng(args.seed)

    def held_out_accuracy() -> float:
        stab.eval()
        hits = []
        with torch.no_grad():
            for start in range(0, len(test), 64):
                chunk = test[start : start + 64]
                index = torch.tensor([v for v, *_ in chunk])
                logits = read(stab(_normalise(videos["test"][0][index]), videos["test"][1][index].float()))
                hits += [int(row.argmax()) == CLASSES.index(answer) for row, (_, _, answer, _) in zip(logits, chunk)]
        stab.train()
        return float(np.mean(hits))

    start, losses = time.time(), []
    for step in range(args.steps):
        items = [train[i] for i in rng.integers(0, len(train), args.batch)]
        index = torch.tensor([v for v, _, _ in items])
        logits = read(stab(_normalise(videos["train"][0][index]), videos["train"][1][index].float()))
        loss = F.cross_entropy(logits, torch.tensor([CLASSES.index(a) for _, _, a in items]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        lr_schedule.step()
        losses.append(loss.item())
        if (step + 1) % 200 == 0:
            print(f"reader={args.reader} init={args.init} seed={args.seed} step {step + 1}: "
                  f"train loss {np.mean(losses[-50:]):.3f}  held-out direction accuracy {held_out_accuracy():.3f}  "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
