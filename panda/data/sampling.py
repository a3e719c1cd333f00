"""The training batch order: seeded, chunk-aware, length-grouped, weighted across sources, split
across ranks, and resumable part-way through an epoch.

Epoch ``e`` is planned the same way on every rank, from the seed and ``e`` alone:

1. **Per source** (Valley, Video-ChatGPT, or one JSON record list): the kept members (a seeded
   ``fraction`` of them, fixed across epochs) are ordered chunk by chunk — the order of the litdata
   chunks is shuffled, then samples are shuffled within windows of ``shuffle_window`` — so loader
   workers read a few chunks at a time (an object store is read chunk-wise, not randomly). JSON
   records are single-sample chunks: a full shuffle.
2. **Quota**: without weights a source contributes each member once; with weights it contributes
   ``round(N · w / Σw)`` samples, ``N = samples_per_epoch`` (default: all members), cycling through
   fresh orders when it must repeat. A source's ``cap`` lowers its quota to at most that many
   samples per epoch (the other sources' quotas stay as they are: the epoch gets shorter); a capped
   source takes the first ``cap`` of that epoch's fresh order, so later epochs reach other samples.
3. **Length grouping**: within each group of ``group_batches · batch_size`` consecutive samples, the
   samples are sorted by text length and cut into batches, and those batches are shuffled; batches
   then hold similar lengths (less padding) while the epoch stays shuffled at the group scale.
4. **Mixing**: batches (each from one source) are interleaved in a seeded random order.
5. **Ranks** take contiguous blocks of the batch list (each rank reads its own chunks), padded to
   equal length by repeating the first batches, as ``DistributedSampler`` pads samples. DataLoader
   workers then take alternate batches of their rank's block, so across ranks × workers every
   batch — and every sample — is read once per epoch (the padding aside).

Batches are lists of ``(index, epoch, position)``; :class:`Positioned` turns them back into
samples tagged with their batch's position, which the training loop records, so a checkpoint
knows exactly how far the epoch got. ``resume(epoch, batches_done)`` makes the next iteration
continue that epoch after those batches: a resumed run sees exactly the batches an uninterrupted
run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler


@dataclass
class SourceSpec:
    """One source of ``size`` samples; ``chunks[i]`` is the storage chunk sample ``i`` is read from
    (samples of a chunk are kept together; one chunk per sample = a full shuffle)."""

    name: str
    size: int
    chunks: Sequence[int]
    lengths: Optional[Sequence[int]] = None  # text length per sample (tokens or characters)
    weight: Optional[float] = None
    cap: Optional[int] = None  # at most this many samples of the source per epoch


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class EpochBatchSampler(Sampler[list[int]]):
    """Yields batches of global sample indices (source ``j``'s samples start at the sum of the
    earlier sources' sizes). See the module docstring for the plan."""

    def __init__(self, sources: Sequence[SourceSpec], batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True, samples_per_epoch: Optional[int] = None, shuffle_window: int = 4096,
                 group_by_length: bool = True, group_batches: int = 32, fraction: float = 1.0, fraction_seed: int = 0,
                 resume_from: Optional[Callable[[int], Optional[tuple[int, int]]]] = None):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad batch_size/rank/world: {batch_size}/{rank}/{world}")
        weights = [s.weight for s in sources]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise ValueError("give every data source a weight, or none (then each contributes all its samples)")
        if any(w is not None and w <= 0 for w in weights):
            raise ValueError(f"data source weights must be > 0, got {weights}")
        for s in sources:
            if len(s.chunks) != s.size:
                raise ValueError(f"source {s.name}: {len(s.chunks)} chunk ids for {s.size} samples")
            if s.cap is not None and s.cap < 1:
                raise ValueError(f"source {s.name}: cap must be >= 1, got {s.cap}")
        self.sources, self.batch_size, self.seed = list(sources), batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.shuffle_window, self.group_by_length, self.group_batches = max(1, shuffle_window), group_by_length, max(1, group_batches)
        self.offsets = np.cumsum([0] + [s.size for s in sources])[:-1].tolist()
        # arrays once: indexing a Python list of 800K lengths per window would cost ~45 s per epoch plan
        self._chunks = [np.asarray(s.chunks) for s in sources]
        self._lengths = [None if s.lengths is None else np.asarray(s.lengths) for s in sources]
        self.members = [self._subset(j, s, fraction, fraction_seed) for j, s in enumerate(sources)]
        total = samples_per_epoch or sum(len(m) for m in self.members)
        if weights[0] is None:
            self.quotas = [len(m) for m in self.members]
        else:
            self.quotas = [int(round(total * w / sum(weights))) for w in weights]
        self.quotas = [q if s.cap is None else min(q, s.cap) for s, q in zip(sources, self.quotas)]
        for s, m, q in zip(sources, self.members, self.quotas):
            if q and not len(m):
                raise ValueError(f"data source {s.name!r} has no samples")
        self.resume_from = resume_from  # asked at the first iteration (Lightning may build loaders before restoring)
        self.epoch = 0  # Lightning's epoch counter (set_epoch)
        self.data_epoch = 0  # the epoch of the latest iteration
        self._yielded = False
        self._resume: Optional[tuple[int, int]] = None
        self._skip: Optional[tuple[int, int]] = None  # (data epoch, batches of it already trained)

    @staticmethod
    def _subset(j: int, s: SourceSpec, fraction: float, fraction_seed: int) -> np.ndarray:
        if fraction >= 1.0:
            return np.arange(s.size)
        keep = max(1, round(s.size * fraction))  # a seeded subset, the same every epoch (stage 1: half of Valley)
        return np.sort(_rng(fraction_seed, j).permutation(s.size)[:keep])

    # --- epochs and the resume position ---
    # The data epoch is counted here, not taken from Lightning: Lightning may start iterating a
    # resumed loader before it calls ``set_epoch``, and a multi-worker DataLoader iterates its
    # batch sampler twice when it starts. Rule: an iteration that follows one which yielded
    # batches draws the next epoch; every batch is tagged with (epoch, position) so the training
    # loop can say exactly which batch it finished (prefetching workers run ahead of it).
    def set_epoch(self, epoch: int) -> None:  # Lightning's counter: recorded, not used for the order
        self.epoch = epoch

    @property
    def sampler(self) -> "EpochBatchSampler":
        """Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler``: that is this object."""
        return self

    def resume(self, data_epoch: int, batches_done: int) -> None:
        """The next iteration continues ``data_epoch`` after ``batches_done`` of this rank's batches."""
        self._resume = (data_epoch, batches_done)

    def total_batches(self) -> int:
        return sum(math.ceil(q / self.batch_size) for q in self.quotas)

    def __len__(self) -> int:
        return math.ceil(self.total_batches() / self.world)

    def __iter__(self):
        # a generator: nothing here runs until the first batch is asked for (ModelParallelStrategy
        # creates the loader's iterator before it restores a checkpoint's position)
        if self._resume is None and self.resume_from is not None:  # hands out a restored position once
            self._resume = self.resume_from(len(self))
        if self._resume is not None:
            self.data_epoch, skip = self._resume
            self._skip = (self.data_epoch, skip)
            self._resume, self._yielded = None, False
        elif self._yielded:
            self.data_epoch += 1
            self._yielded = False
        epoch = self.data_epoch
        skip = self._skip[1] if self._skip is not None and self._skip[0] == epoch else 0
        batches = self.rank_batches(epoch)
        for pos in range(skip, len(batches)):
            self._yielded = True
            yield [(i, epoch, pos) for i in batches[pos]]

    # --- the plan ---
    def rank_batches(self, data_epoch: int) -> list[list[int]]:
        batches = self.epoch_batches(data_epoch)
        per = len(self)
        batches = batches + batches[: per * self.world - len(batches)]
        return batches[self.rank * per: (self.rank + 1) * per]

    def epoch_batches(self, data_epoch: int) -> list[list[int]]:
        """Every rank's batches of one epoch, in order."""
        per_source = [self._source_batches(j, data_epoch) for j in range(len(self.sources))]
        if len(per_source) == 1:
            return per_source[0]
        picks = np.concatenate([np.full(len(b), j) for j, b in enumerate(per_source)]).astype(int)
        if self.shuffle:
            picks = _rng(self.seed, data_epoch, 1_000_003).permutation(picks)
        cursors = [0] * len(per_source)
        out = []
        for j in picks.tolist():
            out.append(per_source[j][cursors[j]])
            cursors[j] += 1
        return out

    def _order(self, j: int, data_epoch: int, cycle: int) -> np.ndarray:
        """One pass over source ``j``'s members: chunk order shuffled, then windows shuffled."""
        members = self.members[j]
        if not self.shuffle:
            return members
        rng = _rng(self.seed, data_epoch, j, cycle)
        chunk_of = self._chunks[j][members]
        chunk_rank = rng.permutation(int(chunk_of.max()) + 1)[chunk_of]  # position of each member's chunk in the new order
        order = members[np.argsort(chunk_rank, kind="stable")]
        w = self.shuffle_window
        return np.concatenate([rng.permutation(order[i: i + w]) for i in range(0, len(order), w)]) if len(order) else order

    def _source_batches(self, j: int, data_epoch: int) -> list[list[int]]:
        quota = self.quotas[j]
        parts, have, cycle = [], 0, 0
        while have < quota:
            order = self._order(j, data_epoch, cycle)
            parts.append(order)
            have += len(order)
            cycle += 1
        order = np.concatenate(parts)[:quota] if parts else np.zeros(0, dtype=int)
        lengths = self._lengths[j]
        group = self.group_batches * self.batch_size
        rng = _rng(self.seed, data_epoch, j, 7919)
        batches = []
        for i in range(0, len(order), group):
            window = order[i: i + group]
            if self.group_by_length and lengths is not None:
                window = window[np.argsort(-lengths[window], kind="stable")]
            cut = [window[k: k + self.batch_size] for k in range(0, len(window), self.batch_size)]
            if self.shuffle and self.group_by_length and lengths is not None:
                cut = [cut[k] for k in rng.permutation(len(cut))]
            batches += cut
        offset = self.offsets[j]
        return [(b + offset).tolist() for b in batches]


class Positioned:
    """A dataset read through :class:`EpochBatchSampler`: ``(index, epoch, position)`` in, the
    sample (or its error) out with ``"position": (epoch, position)`` added."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch, position = key
        sample = self.dataset[index]
        sample["position"] = (epoch, position)
        return sample
