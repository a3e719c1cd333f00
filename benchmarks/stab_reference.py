"""A straightforward per-video, per-frame STAB forward, as the official code is written.

It reuses :class:`~panda.models.stab.STAB`'s submodules but loops over videos, chunks and
frames in Python. It is the parity reference for the batched forward (``tests/test_stab.py``)
and the baseline of ``stab_speed.py`` and ``step_vs_release_style.py`` here; it is not part of
the ``panda`` package. Use :meth:`STAB.forward` for real work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from panda.models.stab import STAB, VisualTokens


def frame_tokens(stab: STAB, x: torch.Tensor, video_ctx: torch.Tensor | None) -> torch.Tensor:
    """One frame's sequence from its (1, h', w', d) spatial tokens: FSRA, α-fusion, row tokens."""
    _, hh, ww, d = x.shape
    frame_ctx = stab.fsra(stab.frame_query[None], x.reshape(1, hh * ww, d)) if stab.fsra is not None else None
    context = stab._fuse(video_ctx, frame_ctx)
    if stab.row_token is not None:
        x = torch.cat([x, stab.row_token.expand(1, hh, 1, d)], dim=2)
    seq = x.reshape(-1, d)
    return torch.cat([context, seq]) if context is not None else seq


@torch.no_grad()
def looped_stab_forward(stab: STAB, pixels: torch.Tensor, mask: torch.Tensor) -> VisualTokens:
    cfg = stab.cfg
    T, s = cfg.chunk_size, cfg.window
    batch, frames = pixels.shape[:2]
    downsampled = cfg.lsd_before_lste
    tokens, lengths = [], []
    for b in range(batch):
        x = stab.patch_embed(pixels[b])  # (F, d, g, g)
        valid = F.avg_pool2d(mask[b][:, None], cfg.patch_size)[:, 0] > 0.5
        if downsampled:
            x = stab.reducer.downsample(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            valid = F.avg_pool2d(valid[:, None].float(), s)[:, 0] > 0.5
        video_ctx = [None] * frames
        if stab.temporal and (stab.lste is not None or stab.gstra is not None):
            chunks = []
            for c in range(frames // T):
                volume = x[c * T : (c + 1) * T].transpose(0, 1)[None]  # (1, d, T, g, g)
                feats = stab.lste(volume) if stab.lste is not None else volume
                if stab.gstra is not None:
                    g = stab.gstra(feats.flatten(2).transpose(1, 2))  # (1, d)
                    video_ctx[c * T : (c + 1) * T] = [g] * T
                chunks.append((feats + volume)[0].transpose(0, 1) if stab.lste is not None else volume[0].transpose(0, 1))
            x = torch.cat(chunks)
        for f in range(frames):
            rows = valid[f].any(1).nonzero().flatten().tolist()
            cols = valid[f].any(0).nonzero().flatten().tolist()
            if rows:
                top, h, left, w = rows[0], len(rows), cols[0], len(cols)
            else:
                top, left, h, w = 0, 0, valid.shape[1] // 2, valid.shape[2] // 2
            crop = x[f, :, top : top + h, left : left + w].permute(1, 2, 0)[None]  # (1, h, w, d)
            if cfg.fixed_side:  # PR: the latents attend to the valid patches only (a crop, no mask)
                side = cfg.fixed_side
                patches = crop.flatten(1, 2) if rows else x[f].flatten(1).T[None]  # a padding frame: every patch
                crop = stab.reducer.resample(patches, torch.ones(patches.shape[:2], dtype=torch.bool)).view(1, side, side, -1)
            elif not downsampled:
                crop = stab.reducer.downsample(crop)  # (1, h/s, w/s, d)
            seq = frame_tokens(stab, crop, video_ctx[f])
            tokens.append(seq)
            lengths.append(seq.shape[0])
    return VisualTokens(torch.cat(tokens), torch.tensor(lengths).view(batch, frames))
