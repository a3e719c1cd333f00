"""Read the shards ``python -m panda.data.prepare`` writes: locally, or from an object store
(``s3://``, ``gs://``, ``azure://``, ``hf://``, ``r2://``, ``local:`` — whatever litdata reads).

A source is one prepared folder. :class:`ShardSource` reads its two small index files
(litdata's ``index.json`` for the chunk layout, ``panda_index.json`` for the per-sample text
lengths) without touching the chunks; :class:`ShardDataset` reads samples by global index through
``litdata.StreamingDataset`` (which downloads and caches remote chunks), decodes the stored video
bytes and tokenises the stored conversation. A sample that fails (a corrupt entry, a video that
no longer decodes) comes back as ``{"error": ...}`` naming the source, the entry and the video:
the collator drops it and training counts it — it is never replaced by another sample.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

from torch.utils.data import Dataset

from panda.data.conversation import ConversationTemplate, tokenize_conversation
from panda.data.datasets import sample_frames
from panda.data.frame_store import check_frame_store, read_frames
from panda.data.prepare import FORMAT, INDEX_FILE
from panda.errors import PandaError, SampleError, VideoDecodeError


class ShardFormatError(PandaError):
    """A data source is not a folder prepared by ``python -m panda.data.prepare``."""


def is_remote(path: str) -> bool:
    return "://" in path or path.startswith("local:")


def _fetch(path: str, name: str, dest: str) -> str:
    """Download ``path/name`` (an object-store folder) to ``dest``, fresh every time (index files are small)."""
    from litdata.streaming.downloader import get_downloader

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.exists(dest):
        os.remove(dest)
    try:
        get_downloader(path, os.path.dirname(dest), []).download_file(f"{path}/{name}", dest)
    except Exception as exc:
        raise ShardFormatError(f"cannot fetch {path}/{name}: {type(exc).__name__}: {exc} (is {path} a folder "
                               "written by `python -m panda.data.prepare`, and are the storage credentials set?)") from exc
    return dest


def _raw_data_in(path: str) -> tuple[list[str], int]:
    """(annotation .json files, video files) that ``path`` is or directly holds: raw data, not shards."""
    from panda.data.datasets import VIDEO_EXTENSIONS

    if os.path.isfile(path):
        return ([path] if path.endswith(".json") else []), int(path.lower().endswith(VIDEO_EXTENSIONS))
    if not os.path.isdir(path):
        return [], 0
    names, videos = [], 0
    for dirpath, _, files in os.walk(path):
        if dirpath.count(os.sep) - path.count(os.sep) > 2:  # records/videos sit near the top; no full walk
            continue
        names += [os.path.join(dirpath, f) for f in files if f.endswith(".json") and f != INDEX_FILE]
        videos += sum(1 for f in files if f.lower().endswith(VIDEO_EXTENSIONS))
    return sorted(names), videos


def _read_local(path: str, name: str) -> dict:
    local = os.path.join(path, name)
    if not os.path.exists(local):
        records, videos = _raw_data_in(path)
        if records or videos:
            found = ", ".join(filter(None, [f"annotation file(s) {records[:3]}" if records else "",
                                            f"{videos} video file(s)" if videos else ""]))
            raise ShardFormatError(
                f"{path} holds raw data ({found}), not prepared shards: run `python -m panda.data.prepare "
                f"--records {records[0] if records else 'RECORDS.json'} --video-root VIDEO_FOLDER --output SHARDS` and "
                f"set data.root=SHARDS, or train on the raw files with data=json data.root=FOLDER "
                f"data.train_records=[RECORDS.json] data.video_root=VIDEOS (see docs/data.md, 'Train on your own videos')")
        hint = ("run `python -m panda.data.prepare --records ... --video-root ... --output "
                f"{path}` first" if not os.path.isdir(path) or not os.listdir(path) else
                "an interrupted prepare? rerun it with --resume")
        raise ShardFormatError(f"{local} not found: {path} is not a prepared shard folder ({hint})")
    with open(local, encoding="utf-8") as f:
        return json.load(f)


def open_indexes(path: str, cache_root: str | None) -> tuple[dict, dict, str | None]:
    """(litdata index, panda index, cache dir). A remote source's chunks are cached in a folder
    named after the URL *and* its current index, so a re-prepared dataset never meets stale chunks."""
    if not is_remote(path):
        return _read_local(path, "index.json"), _read_local(path, INDEX_FILE), None
    root = cache_root or os.path.join(os.path.expanduser("~"), ".cache", "panda", "shards")
    url_key = hashlib.sha1(path.encode()).hexdigest()[:16]
    staging = os.path.join(root, "indexes", f"{url_key}.{os.getpid()}")
    index_path = _fetch(path, "index.json", os.path.join(staging, "index.json"))
    with open(index_path, "rb") as f:
        raw = f.read()
    cache_dir = os.path.join(root, f"{url_key}-{hashlib.sha1(raw).hexdigest()[:12]}")
    meta_path = _fetch(path, INDEX_FILE, os.path.join(staging, INDEX_FILE))
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    shutil.rmtree(staging, ignore_errors=True)
    return json.loads(raw), meta, cache_dir


@dataclass
class ShardSource:
    """One prepared folder: ``num_entries`` stored videos in chunks; ``records[r] = (entry, k)``
    is record ``r``'s video entry and its position among that entry's records."""

    name: str
    path: str  # local folder or object-store URL
    cache_dir: str | None  # where litdata keeps downloaded chunks of a remote source
    num_entries: int
    chunk_sizes: list[int]  # entries per chunk, in order
    records: list[list[int]]
    lengths: list[int]  # text length per record
    length_unit: str
    weight: float | None = None
    frame_store: dict | None = None  # prepared with --store frames: the settings its frames were made with
    videos: list | None = None  # [height, width, frames, fps] per record (None: prepared before panda stored it)

    @property
    def num_records(self) -> int:
        return len(self.records)

    def record_chunks(self) -> list[int]:
        """The chunk holding each record's video (what the sampler keeps together)."""
        chunk_of_entry = [c for c, n in enumerate(self.chunk_sizes) for _ in range(n)]
        return [chunk_of_entry[e] for e, _ in self.records]

    @classmethod
    def open(cls, name: str, path: str, weight: float | None = None, cache_root: str | None = None) -> "ShardSource":
        path = path.rstrip("/")
        index, meta, cache_dir = open_indexes(path, cache_root)
        if meta.get("format") != FORMAT:
            raise ShardFormatError(f"{path}/{INDEX_FILE}: format {meta.get('format')!r}, expected {FORMAT!r} "
                                   "(prepare it again with this version of panda)")
        chunk_sizes = [int(c["chunk_size"]) for c in index["chunks"]]
        if sum(chunk_sizes) != meta["num_entries"] or len(meta["lengths"]) != len(meta["records"]):
            raise ShardFormatError(f"{path}: index.json holds {sum(chunk_sizes)} entries, {INDEX_FILE} "
                                   f"{meta['num_entries']}: the folder is inconsistent; prepare it again")
        videos = meta.get("videos")
        if videos is not None and (len(videos) != len(meta["records"]) or any(v is None for v in videos)):
            videos = None  # resumed across panda versions: part of the index lacks them; group by text alone
        return cls(name, path, cache_dir, meta["num_entries"], chunk_sizes, meta["records"], meta["lengths"],
                   meta["length_unit"], weight, meta.get("frame_store"), videos)

    def llm_lengths(self, rule, frames: int) -> list[int] | None:
        """Each record's length as the LLM sees it: text (tokens; characters / 4 when prepared without
        ``--tokenizer``) plus its video's visual tokens under ``rule`` (a SamplingRule) — what length
        grouping should sort by, since the visual tokens (8 x 154 for 16:9, 8 x 273 for square at
        release sizes) dominate a sample. None when the index has no video sizes."""
        if self.videos is None or rule is None:
            return None
        scale = 1.0 if self.length_unit == "tokens" else 0.25

        def visual_tokens(height, width, num_frames, fps) -> int:
            if rule.mode == "release":
                return rule.video_tokens(frames, height, width)
            count = rule.frame_count(num_frames, fps, height, width)
            return rule.visual_tokens(count, min(count, num_frames), height, width)

        known: dict[tuple, int] = {}  # videos share a few sizes: each computed once (800K records at start-up)
        out = []
        for text, video in zip(self.lengths, self.videos):
            key = tuple(video) if rule.mode != "release" else tuple(video[:2])
            if key not in known:
                known[key] = visual_tokens(*video)
            out.append(int(round(text * scale)) + known[key])
        return out


class ShardDataset(Dataset):
    """Training samples (records) from one or more prepared sources, by global index (sources in order)."""

    def __init__(self, sources: list[ShardSource], tokenizer, template: ConversationTemplate, pipeline,
                 max_length: int, visual_tokens_per_frame: int):
        self.sources = sources
        self.starts = [0]
        for s in sources:
            self.starts.append(self.starts[-1] + s.num_records)
        self.tokenizer, self.template, self.pipeline = tokenizer, template, pipeline
        self.max_length, self.visual_tokens_per_frame = max_length, visual_tokens_per_frame
        # a frame store must hold exactly the frames this pipeline would decode: checked before training starts
        self.frame_specs = [check_frame_store(s.path, s.frame_store, pipeline) if s.frame_store else None for s in sources]
        self._streams = None  # one litdata reader per source, opened in the process that reads
        self._pid = None

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):  # loader workers open their own readers
        state = self.__dict__.copy()
        state["_streams"], state["_pid"] = None, None
        return state

    def _stream(self, j: int):
        if self._streams is None or self._pid != os.getpid():
            self._streams = [None] * len(self.sources)
            self._pid = os.getpid()
        if self._streams[j] is None:
            from litdata import StreamingDataset

            s = self.sources[j]
            self._streams[j] = StreamingDataset(s.path, cache_dir=s.cache_dir)
        return self._streams[j]

    def locate(self, index: int) -> tuple[int, int]:
        j = bisect.bisect_right(self.starts, index) - 1
        return j, index - self.starts[j]

    def __getitem__(self, index: int) -> dict:
        j, local = self.locate(index)
        e, k = self.sources[j].records[local]
        entry = f"{self.sources[j].path}#{e}"
        for attempt in range(2):
            try:
                raw = self._stream(j)[e]
                meta = json.loads(raw["meta"])
                rec = meta["records"][k]
                data = bytes(raw["frames"] if self.frame_specs[j] else raw["video"])
                break
            except Exception as exc:  # a damaged chunk entry: litdata and json raise many types
                if isinstance(exc, OSError) and not attempt and is_remote(self.sources[j].path):
                    # a remote source's cached chunk can vanish under a reader (another loader worker
                    # sharing the cache evicts or re-downloads it): reopen the reader and read again, once
                    self._streams[j] = None
                    continue
                return {"error": {"id": f"{entry}/{k}", "path": entry, "reason": f"unreadable shard entry: {type(exc).__name__}: {exc}",
                                  "code": "unreadable_entry"}}
        name = f"{entry} ({meta.get('video')})"
        try:
            spec = self.frame_specs[j]
            if spec is None:
                frames = self.pipeline(data, name=name, backend=meta.get("backend"))
            else:
                try:
                    frames = read_frames(data, meta["frame_store"], spec, with_teacher=bool(self.pipeline.teacher_resolution))
                except Exception as exc:  # PIL and friends raise many types on damaged images
                    raise VideoDecodeError(name, f"stored frames unreadable: {type(exc).__name__}: {exc}",
                                           code="undecodable") from exc
            tok = tokenize_conversation(
                self.tokenizer, self.template, [tuple(t) for t in rec["turns"]], sample_frames(self.pipeline, frames),
                self.max_length, self.visual_tokens_per_frame, rec["id"], name,
            )
        except (VideoDecodeError, SampleError) as exc:  # counted and logged by the training loop
            return {"error": {"id": rec["id"], "path": name, "reason": exc.reason, "code": exc.code}}
        return {"id": rec["id"], "input_ids": tok.input_ids, "labels": tok.labels, **frames}
