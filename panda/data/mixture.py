"""A training mixture: the sources one run trains on, each a prepared shard folder or a records file.

``data.sources`` lists them (docs/data.md, "Mixtures"); the older keys are mixtures too:
``data.shards`` is one of shard folders only (each path used as given), and ``data.train_records``
(with ``data.video_root``) is one records source named ``records`` holding every file listed. Each
source has its own sampling weight, an optional per-epoch cap, and optionally its own frame
sampling (``frames``, ``sampling``, ``sample_fps``, ``max_frames``, ``max_visual_tokens``; the
run's where unset). :class:`panda.data.sampling.EpochBatchSampler` draws every batch from one
source, so a batch has one frame setting.

:class:`MixtureDataset` reads a sample by global index (sources in order, as the sampler numbers
them) and tags it, or its error, with the source's name: the training loop counts samples read and
skipped per source from those tags.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import re
from dataclasses import dataclass

from torch.utils.data import Dataset

from panda.data.shards import is_remote
from panda.errors import ConfigError

RECORDS_SUFFIX = ".json"  # a source whose path ends so is a records file; anything else a prepared shard folder
OVERRIDES = ("frames", "sampling", "sample_fps", "max_frames", "max_visual_tokens")  # per-source frame sampling keys
NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # a source name: it becomes part of metric names (data/source_share/NAME)


@dataclass(frozen=True)
class MixtureSource:
    """One source as the run reads it: paths resolved, its kind decided, the key it came from."""

    name: str
    kind: str  # "shards" (a prepared folder or object-store URL) | "records" (records files + their video folder)
    paths: tuple[str, ...]  # shards: the one folder; records: the files (data.train_records may list several)
    video_root: str | None = None  # records: the folder the records' video paths are relative to
    weight: float | None = None
    cap: int | None = None  # at most this many samples per epoch
    overrides: tuple[tuple[str, object], ...] = ()  # (key, value) of the frame sampling keys this source sets
    key: str = "data.sources"  # where it is configured, for messages: data.sources.N, data.shards.N, data.train_records

    @property
    def path(self) -> str:
        return self.paths[0]


def _resolve(root: str, path: str) -> str:
    return path if is_remote(path) or os.path.isabs(path) else os.path.join(root, path)


def mixture_sources(data) -> list[MixtureSource]:
    """The sources of ``data`` (a ``DataConfig``): ``data.sources``, else ``data.shards``, else one
    records source of ``data.train_records``. Reads nothing."""
    if data.sources:
        out = []
        for i, s in enumerate(data.sources):
            path = _resolve(data.root, s.path)
            records = path.endswith(RECORDS_SUFFIX) and not is_remote(path)
            overrides = tuple((k, getattr(s, k)) for k in OVERRIDES if getattr(s, k) is not None)
            video_root = _resolve(data.root, s.video_root if s.video_root is not None else data.video_root) if records else None
            out.append(MixtureSource(s.name, "records" if records else "shards", (path,), video_root, s.weight, s.cap,
                                     overrides, f"data.sources.{i}"))
        return out
    if data.shards:
        return [MixtureSource(s.name, "shards", (s.path,), None, s.weight, key=f"data.shards.{i}")
                for i, s in enumerate(data.shards)]
    return [MixtureSource("records", "records", tuple(_resolve(data.root, p) for p in data.train_records),
                          _resolve(data.root, data.video_root), key="data.train_records")]


def check_mixture(data, stab, frames: int) -> None:
    """The checks of ``data.sources`` that need no file (``ValueError`` naming the key and the fix):
    names, weights, caps, what else is set beside it, and each source's frame sampling against STAB."""
    from panda.data.budget import sampling_rule

    if not (data.sources or data.shards or data.train_records):
        raise ValueError(f"data={data.name} names no training data: list the sources in data.sources (data=mixture), "
                         "or set data.shards (prepared folders) or data.train_records (records files)")
    if not data.sources:
        return
    if data.shards:
        raise ValueError("data.sources and data.shards are both set: list the shard folders in data.sources "
                         "({name: ..., path: FOLDER}) and set data.shards=[]")
    if data.train_records:
        raise ValueError(f"data.sources is set and so is data.train_records={list(data.train_records)}: a records file is a "
                         "source of its own in data.sources ({name: ..., path: FILE.json, video_root: ...}); set "
                         "data.train_records=[] (data=mixture does)")
    names = [s.name for s in data.sources]
    for i, s in enumerate(data.sources):
        key = f"data.sources.{i}"
        if not NAME.fullmatch(s.name or ""):
            raise ValueError(f"{key}.name={s.name!r}: a source's name may hold letters, digits and _ . + - only "
                             "(it becomes part of the metric data/source_share/NAME)")
        if names.count(s.name) > 1:
            raise ValueError(f"{key}.name={s.name!r}: two sources share this name; give each source its own")
        if s.weight is not None and not s.weight > 0:
            raise ValueError(f"{key}.weight={s.weight} ({s.name}): weights must be > 0 (leave a source out of "
                             "data.sources to drop it)")
        if s.cap is not None and s.cap < 1:
            raise ValueError(f"{key}.cap={s.cap} ({s.name}): a cap is the most samples of this source per epoch, >= 1 "
                             "(null: no cap)")
        if s.video_root is not None and not s.path.endswith(RECORDS_SUFFIX):
            raise ValueError(f"{key}.video_root is set but {key}.path={s.path} is not a records file ({RECORDS_SUFFIX}): "
                             "a prepared shard folder holds its videos; drop video_root")
        own_frames = s.frames if s.frames is not None else frames
        if own_frames < 1 or own_frames % stab.chunk_size:
            raise ValueError(f"{key}.frames={own_frames} ({s.name}) must be a positive multiple of "
                             f"stab.chunk_size={stab.chunk_size}")
        try:
            sampling_rule(merged_sampling(data, dict((k, getattr(s, k)) for k in OVERRIDES if getattr(s, k) is not None)),
                          stab, own_frames)
        except ValueError as exc:  # its message names data.KEY: say which source's key it is
            raise ValueError(f"{key} ({s.name}): {str(exc).replace('data.', f'{key}.')}") from None
    weights = [s.weight for s in data.sources]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise ValueError(f"data.sources: give every source a weight or none (then each contributes all its samples once "
                         f"per epoch), got {dict(zip(names, weights))}")


def merged_sampling(data, overrides: dict):
    """``data``'s frame sampling keys with a source's ``overrides`` on top (a SamplingConfig-like object)."""
    from panda.data.budget import SamplingConfig

    base = {k: getattr(data, k) for k in ("sampling", "sample_fps", "max_frames", "max_visual_tokens")}
    return SamplingConfig(**(base | {k: v for k, v in overrides.items() if k != "frames"}))


def source_pipeline(pipeline, source: MixtureSource):
    """The run's frame pipeline with ``source``'s frame sampling keys on top (the run's where unset)."""
    if not source.overrides:
        return pipeline
    from panda.data.budget import SamplingRule

    o = dict(source.overrides)
    rule = pipeline.sampling or SamplingRule(frames=pipeline.frames, sample_fps=pipeline.sample_fps,
                                             resolution=pipeline.resolution, patch_size=pipeline.patch_size,
                                             ratio=pipeline.ratio)
    rule = dataclasses.replace(rule, mode=o.get("sampling", rule.mode), frames=o.get("frames", rule.frames),
                               sample_fps=o.get("sample_fps", rule.sample_fps), max_frames=o.get("max_frames", rule.max_frames),
                               max_visual_tokens=o.get("max_visual_tokens", rule.max_visual_tokens))
    return dataclasses.replace(pipeline, frames=rule.frames, sample_fps=rule.sample_fps, sampling=rule)


def check_source_paths(sources: list[MixtureSource]) -> None:
    """Before a run builds anything: each local source of ``data.sources`` is a records file or a
    folder, and each records file of ``data.train_records`` exists (``ConfigError`` naming the key
    and what it should be). A folder's index is read, and judged, when the data is set up."""
    for s in sources:
        for path in s.paths:
            if is_remote(path):
                continue
            key = f"{s.key}.path" if s.key.startswith("data.sources") else s.key
            if s.kind == "records":
                if not os.path.isfile(path):
                    raise ConfigError(f"{key}={path}: no such records file ({s.name}); give a JSON list of records in "
                                      "the Valley / Video-ChatGPT format (relative to data.root, or absolute)")
            elif s.key.startswith("data.sources") and not os.path.isdir(path):
                what = "a file" if os.path.exists(path) else "nothing is there"
                raise ConfigError(f"{key}={path} ({s.name}) is neither a prepared shard folder nor a records file "
                                  f"({what}): give the --output folder of `panda prepare` (or an object-store URL), or a "
                                  f"records file ending in {RECORDS_SUFFIX} with its video_root")


class MixtureDataset(Dataset):
    """The sources' datasets one after another, by global index; every sample (and every error)
    carries ``source``: the name of the source it came from."""

    def __init__(self, datasets: list, names: list[str]):
        self.datasets, self.names = datasets, names
        self.starts = [0]
        for d in datasets:
            self.starts.append(self.starts[-1] + len(d))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        j = bisect.bisect_right(self.starts, index) - 1
        return j, index - self.starts[j]

    def __getitem__(self, index: int) -> dict:
        j, local = self.locate(index)
        sample = self.datasets[j][local]
        sample["source"] = self.names[j]
        if "error" in sample:
            sample["error"]["source"] = self.names[j]
        return sample
