"""Sequence packing (``data.packing``): a micro-batch's samples, as the LLM sees them (text +
visual tokens, after splicing), laid end to end in fewer rows instead of one padded row each.

- **Which rows.** Best-fit decreasing: the longest sample first, each into the fullest row it
  still fits, at most ``capacity`` positions per row. The default capacity is the micro-batch's
  longest sample, so a packed row is never wider than the unpacked batch: every row's attention
  costs at most what one unpacked row did, and the rows are fewer.
- **No sample sees another.** ``position_ids`` restart at 0 at every sample, and the LLM is called
  without a 2-D attention mask: Hugging Face models then read the restarts as packed sequences and
  build a block-diagonal causal mask (sdpa / eager), or run flash-attention's variable-length
  kernel (``attn_implementation=flash_attention_2``). The padding at a row's end restarts at 0 too,
  so it is a sequence of its own that no sample attends to.
- **The same loss.** A sample's first label is dropped (it was never a target: unpacked, the shift
  of the causal LM loss drops it too), so the supervised targets are exactly the unpacked batch's and
  the mean cross-entropy over them is the same; the distillation head reads the same visual
  positions, moved to where they were packed.

Packing is planned per micro-batch from the exact token counts STAB produced, so the sampler, its
seeded epoch plan, mid-epoch resume and ``trainer.global_batch_size`` (counted in samples) are
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from panda.constants import IGNORE_INDEX


def plan_rows(lengths: list[int], capacity: int | None = None) -> list[list[int]]:
    """Sample indices per row, at most ``capacity`` positions per row (default, and at least, the
    longest sample): best-fit decreasing, which gives the fewest rows, or — when it pads less — the
    same number of rows balanced (each sample, longest first, into the emptiest row that holds it).
    Deterministic: ties keep the sample order."""
    if not lengths:
        return []
    capacity = max(max(lengths), capacity or 0)
    best_fit = _best_fit_decreasing(lengths, capacity)
    balanced = _balanced(lengths, capacity, len(best_fit))
    if balanced is not None and padded_share(lengths, balanced) < padded_share(lengths, best_fit):
        return balanced
    return best_fit


def _balanced(lengths: list[int], capacity: int, count: int) -> list[list[int]] | None:
    rows: list[list[int]] = [[] for _ in range(count)]
    used = [0] * count
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        r = min(range(count), key=lambda k: (used[k], k))
        if used[r] + lengths[i] > capacity:
            return None
        rows[r].append(i)
        used[r] += lengths[i]
    return rows


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = [r for r, space in enumerate(free) if space >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: (free[r], r))
            rows[best].append(i)
            free[best] -= lengths[i]
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def padded_share(lengths: list[int], rows: list[list[int]] | None = None) -> float:
    """Padding's share of the positions the LLM computes: each row is as wide as the widest."""
    rows = rows if rows is not None else [[i] for i in range(len(lengths))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    return 1.0 - sum(lengths) / (width * len(rows))


@dataclass
class PackedSequences:
    inputs_embeds: torch.Tensor  # (R, W, D)
    real: torch.Tensor  # (R, W) long: 1 at sample positions, 0 at a row's padding
    labels: torch.Tensor | None  # (R, W), each sample's first position ignored
    position_ids: torch.Tensor  # (R, W): restarting at 0 for each sample (and for the padding)
    new_index: torch.Tensor  # (B*M,) where each unpacked position went in the flattened (R*W); -1 for padding
    sample_of: torch.Tensor  # (R, W) the sample each position belongs to; -1 for padding
    rows: list[list[int]]


def pack(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
         capacity: int | None = None) -> PackedSequences:
    """Repack right-padded spliced sequences (B, M, ·) into rows (R, W, ·); see the module docstring."""
    B, M, D = inputs_embeds.shape
    device = inputs_embeds.device
    lengths = attention_mask.sum(1).tolist()
    rows = plan_rows(lengths, capacity)
    W = max(sum(lengths[b] for b in row) for row in rows)
    R = len(rows)
    source = torch.full((R, W), -1, dtype=torch.long)
    position_ids = torch.zeros((R, W), dtype=torch.long)
    sample_of = torch.full((R, W), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for b in row:
            n = lengths[b]
            source[r, offset:offset + n] = b * M + torch.arange(n)
            position_ids[r, offset:offset + n] = torch.arange(n)
            sample_of[r, offset:offset + n] = b
            offset += n
        position_ids[r, offset:] = torch.arange(W - offset)  # the padding: a sequence of its own
    source, position_ids, sample_of = source.to(device), position_ids.to(device), sample_of.to(device)
    flat = source.flatten()
    valid = flat >= 0
    taken = flat[valid]
    embeds = inputs_embeds.new_zeros(R * W, D)
    embeds[valid] = inputs_embeds.flatten(0, 1)[taken]
    new_labels = None
    if labels is not None:
        new_labels = torch.full((R * W,), IGNORE_INDEX, dtype=labels.dtype, device=device)
        new_labels[valid] = labels.flatten()[taken]
        new_labels = new_labels.view(R, W)
        new_labels[position_ids == 0] = IGNORE_INDEX  # a sample's first token is never a target
    new_index = torch.full((B * M,), -1, dtype=torch.long, device=device)
    new_index[taken] = torch.arange(R * W, device=device)[valid]
    return PackedSequences(embeds.view(R, W, D), valid.view(R, W).long(), new_labels, position_ids, new_index,
                           sample_of, rows)
