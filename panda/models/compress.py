"""Temporal token compression on STAB's output (``stab.merge_keep``, ``stab.temporal_pool``; off by
default): a video's later frames give the LLM fewer visual tokens where little changes, so a token
budget holds more frames (docs/model-reference.md, "Temporal token compression").

- **merge** (``merge_keep=q``, in the style of token merging, ToMe): a video's first frame keeps its
  whole grid. Each later frame compares each spatial token with the token at the same place that
  stands for it so far (the running mean of the tokens merged there); it keeps the
  ``ceil(q × rows × cols)`` least similar (cosine) and merges the others into those earlier tokens,
  which become the mean of every token merged into them. Context and row tokens stay.
- **pool** (``temporal_pool=k``): every ``k`` consecutive frames share one grid of spatial tokens, their
  mean, placed in the group's first frame; each frame keeps its own context token.

Both see only a video's frames with content; padding frames keep their tokens. How many tokens each
frame keeps is known on the host before anything runs (:mod:`panda.tokens`), so the splice plans
without reading from the device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from panda.models.host import host_to_device
from panda.tokens import frame_lengths, merge_kept


class _Layout:
    """Where each frame's tokens are in STAB's packed output (host arithmetic)."""

    def __init__(self, lengths: np.ndarray, grids, context: bool, row_tokens: bool):
        self.lengths, self.context, self.row = lengths, int(context), int(row_tokens)
        self.offsets = lengths.cumsum() - lengths
        self.grids = grids

    def spatial(self, n: int) -> np.ndarray:
        """Indices of frame ``n``'s spatial tokens, row-major (rows*cols,)."""
        rows, cols = self.grids[n]
        r, c = np.divmod(np.arange(rows * cols), cols)
        return self.offsets[n] + self.context + r * (cols + self.row) + c

    def row_tokens(self, n: int) -> np.ndarray:
        rows, cols = self.grids[n]
        return self.offsets[n] + self.context + np.arange(rows) * (cols + self.row) + cols if self.row else \
            np.zeros(0, dtype=np.int64)

    def all(self, n: int) -> np.ndarray:
        return self.offsets[n] + np.arange(self.lengths[n])


def compress(tokens: torch.Tensor, lengths: np.ndarray, grids, content: np.ndarray, batch: int, frames: int,
             context: bool, row_tokens: bool, merge_keep: float | None, temporal_pool: int) -> tuple[torch.Tensor, np.ndarray]:
    """STAB's packed tokens (total, d) with per-frame ``lengths`` (N,) and ``grids``, ``content`` (N,) on
    the host, N = batch × frames -> the compressed tokens and their per-frame lengths (N,), host."""
    layout = _Layout(lengths, grids, context, row_tokens)
    new_lengths = lengths.copy()
    videos = []  # (its frame indices with content, (rows, cols))
    for b in range(batch):
        real = [b * frames + f for f in range(frames) if content[b * frames + f]]
        if not real:
            continue
        shapes = {tuple(grids[n]) for n in real}
        if len(shapes) > 1:
            raise ValueError(f"video {b}'s frames have several token grids {sorted(shapes)}; temporal compression "
                             "needs one grid per video")
        grid = shapes.pop()
        new_lengths[real] = frame_lengths(len(real), *grid, context, row_tokens, merge_keep, temporal_pool)
        videos.append((real, grid))
    out_offsets = new_lengths.cumsum() - new_lengths
    untouched = np.ones(len(lengths), dtype=bool)
    for real, _ in videos:
        untouched[real] = False
    # pieces of the output: values and where they go; copies from the input are planned on the host
    src = [layout.all(n) for n in np.flatnonzero(untouched)]
    dest = [out_offsets[n] + np.arange(lengths[n]) for n in np.flatnonzero(untouched)]
    values, value_dest = [], []
    if merge_keep is not None:
        _merge(tokens, layout, videos, out_offsets, merge_keep, src, dest, values, value_dest)
    else:
        _pool(tokens, layout, videos, out_offsets, temporal_pool, src, dest, values, value_dest)
    device = tokens.device
    parts, where = [], []
    if src:
        parts.append(tokens[host_to_device(np.concatenate(src), device)])
        where.append(host_to_device(np.concatenate(dest), device))
    parts += values
    where += value_dest
    out = tokens.new_empty(int(new_lengths.sum()), tokens.shape[1])
    return out.index_copy(0, torch.cat(where), torch.cat(parts)), new_lengths


def _pool(tokens, layout, videos, out_offsets, k, src, dest, values, value_dest):
    """Every k frames' spatial tokens -> their mean, in the group's first frame; each frame keeps its context."""
    device = tokens.device
    members, group_of, group_dest = [], [], []
    slots = 0  # one slot per spatial place of each group: the mean goes there
    for real, (rows, cols) in videos:
        for start in range(0, len(real), k):
            group = real[start:start + k]
            first = group[0]
            members += [layout.spatial(n) for n in group]
            group_of.append(np.tile(np.arange(slots, slots + rows * cols), len(group)))
            r, c = np.divmod(np.arange(rows * cols), cols)
            group_dest.append(out_offsets[first] + layout.context + r * (cols + layout.row) + c)
            slots += rows * cols
            if layout.row:  # the first frame's row tokens, in place
                src.append(layout.row_tokens(first))
                dest.append(out_offsets[first] + layout.context + np.arange(rows) * (cols + layout.row) + cols)
            if layout.context:  # every frame's own context token
                src.append(layout.offsets[group])
                dest.append(out_offsets[group])
    if not members:
        return
    member_index = np.concatenate(members)
    slot = np.concatenate(group_of)
    count = np.bincount(slot)
    index = host_to_device(np.concatenate([member_index, slot]), device)
    gathered = tokens[index[:len(member_index)]]  # (M, d)
    sums = gathered.new_zeros(len(count), tokens.shape[1]).index_add(0, index[len(member_index):], gathered)
    values.append(sums / host_to_device(count, device).to(sums.dtype)[:, None])
    value_dest.append(host_to_device(np.concatenate(group_dest), device))


def _merge(tokens, layout, videos, out_offsets, keep, src, dest, values, value_dest):
    """Merge each later frame's most similar spatial tokens into the tokens standing for them so far."""
    device, d = tokens.device, tokens.shape[1]
    by_shape: dict[tuple[int, int, int], list] = {}
    for real, grid in videos:
        by_shape.setdefault((len(real), *grid), []).append(real)
    for (count, rows, cols), group in by_shape.items():
        P, V = rows * cols, len(group)
        m = merge_kept(rows, cols, keep)
        spatial = np.stack([np.stack([layout.spatial(n) for n in real]) for real in group])  # (V, count, P)
        x = tokens[host_to_device(spatial.reshape(-1), device)].view(V, count, P, d)
        owner = _owners(x.detach(), m)  # (V, count, P): the frame each token is merged into (itself if kept)
        slot = (torch.arange(V, device=device)[:, None, None] * count + owner) * P + torch.arange(P, device=device)
        sums = x.new_zeros(V * count * P, d).index_add(0, slot.reshape(-1), x.reshape(-1, d))
        hits = torch.bincount(slot.reshape(-1), minlength=V * count * P).to(x.dtype)
        merged = (sums / hits.clamp(min=1)[:, None]).view(V, count, P, d)  # each kept token: the mean of its merges
        starts = host_to_device(np.array([[out_offsets[n] for n in real] for real in group]), device)  # (V, count)
        # the first frame: its whole grid, in place
        r, c = np.divmod(np.arange(P), cols)
        first_dest = starts[:, :1] + host_to_device(layout.context + r * (cols + layout.row) + c, device)  # (V, P)
        values.append(merged[:, 0].reshape(-1, d))
        value_dest.append(first_dest.reshape(-1))
        if count > 1:
            # later frames: the m kept tokens in row-major order, a row token after each row's kept tokens
            kept = (owner[:, 1:] == torch.arange(1, count, device=device)[None, :, None])  # (V, count-1, P)
            position = kept.nonzero()  # row-major within each frame: (v, f-1, p), m per frame
            v, f, p = position.unbind(1)
            rank = (kept.cumsum(2) - 1)[v, f, p]  # its index among the frame's kept tokens
            row = torch.div(p, cols, rounding_mode="floor")
            values.append(merged[v, f + 1, p])
            value_dest.append(starts[v, f + 1] + layout.context + rank + row * layout.row)
            if layout.row:
                per_row = kept.view(V, count - 1, rows, cols).sum(3).cumsum(2)  # kept tokens in rows <= r
                row_index = torch.arange(rows, device=device)
                row_src = np.stack([np.stack([layout.row_tokens(n) for n in real[1:]]) for real in group])
                values.append(tokens[host_to_device(row_src.reshape(-1), device)])
                value_dest.append((starts[:, 1:, None] + layout.context + per_row + row_index).reshape(-1))
            assert position.shape[0] == V * (count - 1) * m
        if layout.context:
            src.append(np.concatenate([layout.offsets[real] for real in group]))
            dest.append(np.concatenate([out_offsets[real] for real in group]))
        if layout.row:
            src.append(np.concatenate([layout.row_tokens(real[0]) for real in group]))
            dest.append(np.concatenate([out_offsets[real[0]] + layout.context + np.arange(rows) * (cols + layout.row) + cols
                                        for real in group]))


@torch.no_grad()
def _owners(x: torch.Tensor, m: int) -> torch.Tensor:
    """x: (V, count, P, d) -> (V, count, P) long: for each spatial token the frame whose token it is merged
    into (its own frame if kept). Each later frame keeps its ``m`` tokens least similar (cosine) to the
    running mean of the tokens standing at their place."""
    V, count, P, _ = x.shape
    owner = torch.zeros(V, count, P, dtype=torch.long, device=x.device)
    anchor, weight = x[:, 0].clone(), x.new_ones(V, P, 1)  # the running mean at each place, and its count
    standing = torch.zeros(V, P, dtype=torch.long, device=x.device)  # the frame of the token standing there
    for f in range(1, count):
        similarity = F.cosine_similarity(x[:, f], anchor, dim=-1)  # (V, P)
        kept = torch.zeros(V, P, dtype=torch.bool, device=x.device)
        kept.scatter_(1, similarity.topk(m, dim=1, largest=False).indices, True)
        standing = torch.where(kept, f, standing)
        owner[:, f] = standing
        merged_mean = (anchor * weight + x[:, f]) / (weight + 1)
        anchor = torch.where(kept[..., None], x[:, f], merged_mean)
        weight = torch.where(kept[..., None], 1.0, weight + 1)
    return owner
