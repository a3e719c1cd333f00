"""Validate Valley / Video-ChatGPT records and their videos once, and write litdata shards.

    python -m panda.data.prepare --records DATA_ROOT/train/train_json/valley_.json \\
        --video-root DATA_ROOT/train --output /data/shards/valley --workers 16

Every record is read (a malformed one is rejected with its file and index; JSON that does not parse
stops the job, before anything is written, and names the file and record), its video resolved and
**validated once**: the container is opened, fps, frame count and size are read, and the frames
training samples are decoded (decord, PyAV as the fallback: AV1 and some containers need it). What
passes is written as litdata chunks holding the *encoded* video bytes (``--store video``, the
default: any frame count or sampling can be read from them later) or the sampled frames already
resized for training (``--store frames``: tied to ``--frames``, ``--sample-fps`` and the STAB
geometry, read several times faster; see :mod:`panda.data.frame_store`), and a JSON metadata string
per entry. Each video is stored **once**, with every record that uses it (Video-ChatGPT asks ~7
questions per video); the training sampler still draws records. What fails goes to
``OUT/rejects.jsonl`` as ``{"id", "path", "code", "reason", "source"}`` (one line per record).
Nothing that one record does stops the job.

The work is cut into parts of ``--part-size`` videos, processed by ``--workers`` processes. Each
finished part leaves ``OUT/.parts/<part>.json``; ``--resume`` keeps those and redoes only the rest,
so an interrupted run loses at most one part per worker. A run without ``--resume`` that fails
before finishing any part removes what it wrote, so the same command runs again. The last step
merges the parts into one litdata dataset (``OUT/index.json``, readable by
``litdata.StreamingDataset`` as it is) and writes ``OUT/panda_index.json`` (each record's entry
and text length, for the sampler), ``OUT/stats.json`` (its ``rejected`` count is what a training
run on the shards reports as ``data/prepare_rejected_records``) and ``OUT/rejects.jsonl``.

Reject codes: ``malformed_record``, ``empty_conversation``, ``non_utf8_text``, ``duplicate_id``
(the record), ``missing``, ``empty_file``, ``unreadable``, ``no_video_stream``, ``undecodable``,
``truncated``, ``too_few_frames``, ``frame_too_large`` (the video).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

from panda.data.frame_store import FRAME_FORMATS, FrameStoreSpec, store_frames
from panda.data.records import VideoRecord, load_records
from panda.data.video import DecodedVideo, check_backend, decode_video, probe_video
from panda.errors import PandaError, VideoDecodeError

log = logging.getLogger(__name__)

FORMAT = "panda-shards-v1"
INDEX_FILE = "panda_index.json"  # records -> entries and text lengths, for the sampler; litdata's own is index.json
PARTS_DIR = ".parts"


@dataclass
class PrepareOptions:
    records: list[str]
    video_root: str
    output: str
    workers: int = 1
    resume: bool = False
    frames: int = 8  # the frames training samples (8 in the release); these are test-decoded
    sample_fps: float = 1.0
    # fewer frames in the file than this: reject. Default 1: like the release, a clip shorter than
    # ``frames`` is kept and padded at training time (all-zero frames, all-zero mask;
    # docs/model-reference.md, "Frame sampling")
    min_frames: int = 1
    max_side: int = 4096  # a longer frame side is rejected (decoding it would stall a loader worker)
    chunk_bytes: str = "64MB"
    part_size: int = 256  # videos per resumable unit of work
    tokenizer: str | None = None  # a local tokenizer folder: text lengths in tokens (else characters)
    backend: str = "auto"
    progress: bool = True
    store: str = "video"  # video: the encoded file; frames: the sampled frames, resized (panda.data.frame_store)
    # --store frames only: the STAB geometry the frames are resized for, their encoding, the teacher's copy
    resolution: int = 448
    patch_size: int = 14
    ratio: int = 2
    frame_format: str = "png"  # lossless: the stored pixels are the decoded ones (jpeg: smaller, lossy)
    jpeg_quality: int = 95
    teacher_resolution: int | None = 224  # None/0: no teacher copy (a run with distillation then cannot use the store)

    def frame_store(self) -> FrameStoreSpec | None:
        if self.store == "video":
            return None
        return FrameStoreSpec(self.frames, self.sample_fps, self.resolution, self.patch_size, self.ratio,
                              self.frame_format, self.jpeg_quality, self.teacher_resolution or None)

    def plan_key(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        keys = ("video_root", "frames", "sample_fps", "min_frames", "max_side", "chunk_bytes", "part_size", "tokenizer",
                "store") + (("resolution", "patch_size", "ratio", "frame_format", "jpeg_quality", "teacher_resolution")
                            if self.store == "frames" else ())
        files = [[os.path.abspath(p), os.path.getsize(p), int(os.path.getmtime(p))] for p in self.records]
        return {"records": files, **{k: getattr(self, k) for k in keys}}


class PrepareError(PandaError):
    """The job cannot start or continue (bad arguments, an output folder in the way)."""


@dataclass
class PartResult:
    part: int
    kept: list[dict] = field(default_factory=list)  # per written entry: {"ids", "lengths"} of its records
    rejects: list[dict] = field(default_factory=list)
    source_bytes: int = 0
    backends: dict = field(default_factory=dict)
    seconds: float = 0.0


# --- one record ---------------------------------------------------------------------------------

_TOKENIZERS: dict = {}


def text_length(turns, tokenizer_path: str | None) -> int:
    """Length of a conversation's text: tokens with a tokenizer, else characters."""
    texts = [t for turn in turns for t in turn]
    if not tokenizer_path:
        return sum(len(t) for t in texts)
    if tokenizer_path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[tokenizer_path] = AutoTokenizer.from_pretrained(tokenizer_path)
    tok = _TOKENIZERS[tokenizer_path]
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


def inspect_video(path: str, opts: PrepareOptions) -> tuple[dict, DecodedVideo]:
    """Validate one video the way training will read it. Returns its metadata and the decoded
    frames, or raises :class:`VideoDecodeError` with a reject code."""
    probe = probe_video(path)  # missing, empty_file, unreadable, no_video_stream
    if max(probe.width, probe.height) > opts.max_side:
        raise VideoDecodeError(path, f"frame size {probe.width}x{probe.height} exceeds --max-side {opts.max_side}",
                               code="frame_too_large")
    decoded = decode_video(path, opts.frames, opts.sample_fps, opts.backend)  # undecodable, truncated
    if probe.num_frames and decoded.num_frames < 0.95 * probe.num_frames:
        # decord counts the frames present; a header promising many more means the file was cut short
        raise VideoDecodeError(path, f"{decoded.num_frames} frames present, the header gives {probe.num_frames} "
                               "(file cut short?)", code="truncated")
    min_frames = opts.min_frames
    if decoded.num_frames < min_frames:
        raise VideoDecodeError(path, f"{decoded.num_frames} frame(s), fewer than {min_frames} (--min-frames)",
                               code="too_few_frames")
    height, width = decoded.frames.shape[1:3]
    return {"fps": decoded.fps, "num_frames": decoded.num_frames,
            "duration": round(decoded.num_frames / decoded.fps, 3) if decoded.fps else None,
            "width": int(width), "height": int(height), "codec": probe.codec, "container": probe.container,
            "backend": decoded.backend}, decoded


def make_sample(video: str, records: list[VideoRecord], opts: PrepareOptions) -> tuple[dict, dict, int]:
    """(the shard entry, its metadata, source bytes) for a video that validates, with every record that uses it."""
    path = os.path.join(opts.video_root, video)
    info, decoded = inspect_video(path, opts)
    nbytes = os.path.getsize(path)
    recs = [{"id": r.id, "turns": [list(t) for t in r.turns], "text_length": text_length(r.turns, opts.tokenizer),
             "extra": r.meta} for r in records]
    meta = {"video": video, **info, "records": recs}
    spec = opts.frame_store()
    if spec is not None:  # the frames training reads, sampled and resized once
        data, meta["frame_store"] = store_frames(decoded.frames, spec)
        meta["frame_indices"] = decoded.indices
        return {"frames": data, "meta": json.dumps(meta, ensure_ascii=False)}, meta, nbytes
    with open(path, "rb") as f:
        data = f.read()
    return {"video": data, "meta": json.dumps(meta, ensure_ascii=False)}, meta, nbytes


# --- one part -----------------------------------------------------------------------------------

_PROGRESS = None  # a queue the workers tick per video


def _init_worker(progress) -> None:
    global _PROGRESS
    _PROGRESS = progress
    logging.getLogger("panda.data.video").setLevel(logging.WARNING)


def _part_paths(output: str, part: int) -> tuple[str, str]:
    return os.path.join(output, PARTS_DIR, f"{part}.json"), os.path.join(output, PARTS_DIR, f"{part}.index.json")


@contextlib.contextmanager
def _classic_chunk_layout():
    """litdata's classic chunk layout (an offset table and each item's bytes), whatever is installed.

    With pyarrow importable, litdata 0.2.76 writes chunks of dict samples as an Arrow IPC footer
    with an empty body, and its reader of remote sources (``s3://``, ``local:``...) then reads
    0-byte items (``struct.error: unpack_from requires a buffer of at least 8 bytes``). The footer
    is written only where ``litdata.streaming.item_loader`` sees pyarrow: hide it while writing."""
    from panda.compat import litdata_without_pyarrow

    with litdata_without_pyarrow():
        yield


def prepare_part(part: int, videos: list[tuple[str, list[VideoRecord]]], opts: PrepareOptions) -> PartResult:
    """Validate and write one part: chunks ``chunk-<part>-<i>.bin`` and ``.parts/<part>.json``."""
    with _classic_chunk_layout():
        return _prepare_part(part, videos, opts)


def _prepare_part(part: int, videos: list[tuple[str, list[VideoRecord]]], opts: PrepareOptions) -> PartResult:
    from litdata.streaming.writer import BinaryWriter

    start = time.perf_counter()
    done_path, index_path = _part_paths(opts.output, part)
    for stale in glob.glob(os.path.join(opts.output, f"chunk-{part}-*.bin")) + [index_path]:
        if os.path.exists(stale):  # what an interrupted run left of this part
            os.remove(stale)
    # litdata names chunks and the part index after the writer's rank: make it the part number
    os.environ["DATA_OPTIMIZER_GLOBAL_RANK"] = str(part)
    # msg_queue: litdata's per-part "inferred data format" notes go nowhere instead of to stdout
    writer = BinaryWriter(opts.output, chunk_bytes=opts.chunk_bytes, msg_queue=queue.SimpleQueue())
    result = PartResult(part)
    for video, records in videos:
        path = os.path.join(opts.video_root, video)
        try:  # a video that does not decode or read is rejected with its reason; anything else is a bug: it stops the job
            sample, meta, nbytes = make_sample(video, records, opts)
        except VideoDecodeError as exc:
            reason = exc.reason
            if exc.code == "missing":  # prepare's own flag, not training's data.video_root
                reason = (f"file not found: --video-root {opts.video_root} + the record's 'video' {video!r}; "
                          "check --video-root")
            result.rejects += [{"id": r.id, "path": path, "code": exc.code, "reason": reason, "source": r.source}
                               for r in records]
        except OSError as exc:  # the file decoded but cannot be read back (gone meanwhile, permissions)
            reason = f"cannot read the file: {type(exc).__name__}: {str(exc).strip()[:200]}"
            result.rejects += [{"id": r.id, "path": path, "code": "unreadable", "reason": reason, "source": r.source}
                               for r in records]
        else:
            writer.add_item(len(result.kept), sample)
            result.kept.append({"ids": [r["id"] for r in meta["records"]],
                                "lengths": [r["text_length"] for r in meta["records"]],
                                "video": [meta["height"], meta["width"], meta["num_frames"], meta["fps"]]})
            result.source_bytes += nbytes
            result.backends[meta["backend"]] = result.backends.get(meta["backend"], 0) + 1
        if _PROGRESS is not None:
            _PROGRESS.put(1)
    if result.kept:
        writer.done()
        os.replace(os.path.join(opts.output, f"{part}.index.json"), index_path)
    os.environ.pop("DATA_OPTIMIZER_GLOBAL_RANK", None)
    result.seconds = time.perf_counter() - start
    _write_json(done_path, asdict(result))  # last: its presence marks the part finished
    return result


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


# --- the job ------------------------------------------------------------------------------------

def read_all_records(opts: PrepareOptions) -> tuple[list[VideoRecord], list[dict]]:
    """Every record of every ``--records`` file (ids unique across files), and the record rejects."""
    records, rejects = load_records(opts.records, on_error="skip")
    return records, [{"id": r["id"], "path": None, "code": r["code"], "reason": r["reason"],
                      "source": f"{r['source']}#{r['index']}"} for r in rejects]


def _check_output(opts: PrepareOptions) -> dict:
    """Refuse an output folder in the way (writes nothing); returns the plan this run writes there."""
    plan_path = os.path.join(opts.output, PARTS_DIR, "plan.json")
    key = opts.plan_key()
    if opts.resume:
        if os.path.exists(plan_path):
            with open(plan_path, encoding="utf-8") as f:
                old = json.load(f)
            changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            if changed:
                raise PrepareError(f"--resume: {opts.output} was prepared with different {', '.join(changed)}; "
                                   "rerun with the same arguments, or write to a new --output")
    elif os.path.isdir(opts.output) and os.listdir(opts.output):
        raise PrepareError(f"{opts.output} is not empty: pass --resume to continue an interrupted run, "
                           "or choose a new --output")
    return key


def _finished_parts(output: str) -> list[str]:
    """The part markers (``.parts/<part>.json``) of ``output``: what ``--resume`` keeps."""
    folder = os.path.join(output, PARTS_DIR)
    return [n for n in os.listdir(folder) if re.fullmatch(r"\d+\.json", n)] if os.path.isdir(folder) else []


def _remove_unfinished_output(output: str, created: bool) -> None:
    """After a fresh run (no ``--resume``) failed: if no part was finished, nothing written is worth
    resuming, so leave ``output`` as the run found it (absent, or empty as :func:`_check_output`
    required) and the same command can simply run again. Finished parts stay for ``--resume``."""
    if _finished_parts(output):
        return
    if created:
        shutil.rmtree(output, ignore_errors=True)
        return
    for name in os.listdir(output):
        path = os.path.join(output, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="video", desc="prepare", dynamic_ncols=True, disable=not enabled, file=sys.stderr)


def _run_parts(todo: list[tuple[int, list[VideoRecord]]], opts: PrepareOptions, bar) -> list[PartResult]:
    if opts.workers <= 1:
        class Ticks:
            put = bar.update

        _init_worker(Ticks())
        results = [prepare_part(part, recs, opts) for part, recs in todo]
        _init_worker(None)
        return results
    ctx = multiprocessing.get_context("spawn")  # decoders and litdata threads do not survive fork well
    ticks = ctx.SimpleQueue()
    with ctx.Pool(opts.workers, initializer=_init_worker, initargs=(ticks,)) as pool:
        pending = [pool.apply_async(prepare_part, (part, recs, opts)) for part, recs in todo]
        while not all(p.ready() for p in pending):
            while not ticks.empty():
                bar.update(ticks.get())
            time.sleep(0.1)
        results = [p.get() for p in pending]  # re-raises a worker crash
    while not ticks.empty():
        bar.update(ticks.get())
    ticks.close()
    del ticks
    return results


def _merge(opts: PrepareOptions, parts: list[PartResult]) -> tuple[int, int]:
    """One litdata index over every part's chunks, in part order. Returns (entries, shard bytes)."""
    chunks, config = [], None
    for res in parts:
        if not res.kept:
            continue
        with open(_part_paths(opts.output, res.part)[1], encoding="utf-8") as f:
            index = json.load(f)
        config = config or index["config"]
        chunks += index["chunks"]
    if config is None:
        raise PrepareError(f"no record of {opts.records} passed validation; see {opts.output}/rejects.jsonl")
    _write_json(os.path.join(opts.output, "index.json"), {"chunks": chunks, "config": config, "updated_at": str(time.time())})
    shard_bytes = sum(os.path.getsize(os.path.join(opts.output, c["filename"])) for c in chunks)
    return sum(c["chunk_size"] for c in chunks), shard_bytes


def prepare(opts: PrepareOptions) -> dict:
    """Run the whole job; returns the stats written to ``OUT/stats.json``."""
    start = time.perf_counter()
    _check_options(opts)
    plan = _check_output(opts)
    records, record_rejects = read_all_records(opts)  # JSON that does not parse stops the job before it writes
    created = not os.path.isdir(opts.output)
    try:
        os.makedirs(os.path.join(opts.output, PARTS_DIR), exist_ok=True)
        _write_json(os.path.join(opts.output, PARTS_DIR, "plan.json"), plan)
        return _write_shards(opts, records, record_rejects, start)
    except BaseException:
        if not opts.resume:
            _remove_unfinished_output(opts.output, created)
        raise


def _check_options(opts: PrepareOptions) -> None:
    """Refuse options the job cannot run with (:class:`PrepareError`), before anything is read or written."""
    for path in opts.records:
        if not os.path.isfile(path):
            raise PrepareError(f"--records {path}: file not found")
    if not os.path.isdir(opts.video_root):
        raise PrepareError(f"--video-root {opts.video_root}: not a folder")
    if opts.part_size < 1 or opts.workers < 1:
        raise PrepareError("--part-size and --workers must be at least 1")
    try:
        check_backend(opts.backend)
    except ValueError as exc:
        raise PrepareError(f"--backend {opts.backend}: {exc}") from exc
    if opts.store not in ("video", "frames"):
        raise PrepareError(f"--store {opts.store}: use video or frames")
    if opts.tokenizer:
        _check_tokenizer(opts.tokenizer)
    if opts.store == "frames":
        _check_frame_store(opts)


def _check_tokenizer(path: str) -> None:
    """Load the ``--tokenizer`` once, here: one that cannot load is the job's error, not every video's."""
    try:
        text_length([("",)], path)
    except (OSError, ValueError) as exc:
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrepareError(f"--tokenizer {path}: no tokenizer loads from it ({said})") from exc


def _check_frame_store(opts: PrepareOptions) -> None:
    """``--store frames``: the frame encoding, and the geometry the frames (and the teacher's copy) are resized to."""
    from panda.data.frames import frame_geometry

    try:
        opts.frame_store()
        frame_geometry(1, 1, opts.resolution, opts.patch_size, opts.ratio)
        if opts.teacher_resolution:
            frame_geometry(1, 1, opts.teacher_resolution, 14, 1)
    except ValueError as exc:
        raise PrepareError(f"--store frames: {exc}") from exc


def _write_shards(opts: PrepareOptions, records: list[VideoRecord], record_rejects: list[dict], start: float) -> dict:
    """Validate and write every part not finished yet, merge the parts into one litdata dataset, and
    write ``OUT/rejects.jsonl``, ``OUT/panda_index.json`` and ``OUT/stats.json``; returns the stats."""
    videos = _group_by_video(records)
    log.info("%d records on %d videos read (%d rejected as records) from %s", len(records), len(videos),
             len(record_rejects), opts.records)
    parts = [(p, videos[i: i + opts.part_size]) for p, i in enumerate(range(0, len(videos), opts.part_size))]
    reused = _reused_parts(opts, parts) if opts.resume else {}
    todo = [(p, recs) for p, recs in parts if p not in reused]
    results = _finish_parts(opts, parts, reused, todo, len(videos))
    rejects = record_rejects + [r for res in results for r in res.rejects]
    _write_rejects(opts.output, rejects)
    num_entries, shard_bytes = _merge(opts, results)
    kept_ids = _write_index(opts, results, num_entries)
    stats = _stats(opts, records_seen=len(records) + len(record_rejects), videos_seen=len(videos), parts=len(parts),
                   todo=todo, results=results, rejects=rejects, kept_ids=kept_ids, num_entries=num_entries,
                   shard_bytes=shard_bytes, start=start)
    _write_json(os.path.join(opts.output, "stats.json"), stats)
    log.info("kept %d of %d records (%s); shards %.1f MB from %.1f MB of video", len(kept_ids), stats["records_seen"],
             ", ".join(f"{k} {v}" for k, v in stats["rejected_by_reason"].items()) or "no rejects",
             shard_bytes / 1e6, stats["source_bytes"] / 1e6)
    return stats


def _group_by_video(records: list[VideoRecord]) -> list[tuple[str, list[VideoRecord]]]:
    """(video, its records) in the order videos first appear: each video is validated and stored
    once, with all its records."""
    by_video: dict[str, list[VideoRecord]] = {}
    for rec in records:
        by_video.setdefault(rec.video, []).append(rec)
    return list(by_video.items())


def _reused_parts(opts: PrepareOptions, parts: list[tuple[int, list]]) -> dict[int, PartResult]:
    """``--resume``: the results of the parts an earlier run finished (each ``.parts/<part>.json``), by part."""
    finished: dict[int, PartResult] = {}
    for part, _ in parts:
        done_path = _part_paths(opts.output, part)[0]
        if os.path.exists(done_path):
            with open(done_path, encoding="utf-8") as f:
                finished[part] = PartResult(**json.load(f))
    return finished


def _finish_parts(opts: PrepareOptions, parts: list[tuple[int, list]], reused: dict[int, PartResult],
                  todo: list[tuple[int, list]], total_videos: int) -> list[PartResult]:
    """Every part's result, in part order: the ``reused`` ones as they are, the ``todo`` ones
    prepared now, under a progress bar over all ``total_videos``."""
    finished = dict(reused)
    bar = _progress_bar(total_videos, opts.progress)
    bar.update(sum(len(recs) for p, recs in parts if p in finished))
    if finished:
        log.info("--resume: %d of %d parts already written, %d to go", len(finished), len(parts), len(todo))
    for res in _run_parts(todo, opts, bar):
        finished[res.part] = res
    bar.close()
    return [finished[p] for p, _ in parts]


def _write_rejects(output: str, rejects: list[dict]) -> None:
    """``OUT/rejects.jsonl``: one line per rejected record."""
    with open(os.path.join(output, "rejects.jsonl"), "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_index(opts: PrepareOptions, results: list[PartResult], num_entries: int) -> list[str]:
    """``OUT/panda_index.json``, for the sampler: per kept record, its [entry, record within the
    entry], text length and video [height, width, frames, fps]. Returns the kept record ids, in order."""
    entries = [k for res in results for k in res.kept]
    record_entries = [[e, k] for e, entry in enumerate(entries) for k in range(len(entry["ids"]))]
    kept_ids = [rid for entry in entries for rid in entry["ids"]]
    _write_json(os.path.join(opts.output, INDEX_FILE), {
        "format": FORMAT, "num_entries": num_entries, "num_records": len(record_entries),
        "records": record_entries, "lengths": [n for entry in entries for n in entry["lengths"]],
        # [height, width, frames, fps] per record: the sampler adds each video's visual tokens to its text length
        "videos": [entry.get("video") for entry in entries for _ in entry["lengths"]],
        "length_unit": "tokens" if opts.tokenizer else "characters",
        "frames_validated": opts.frames, "sample_fps": opts.sample_fps,
        "store": opts.store, "frame_store": opts.frame_store().to_dict() if opts.store == "frames" else None})
    return kept_ids


def _stats(opts: PrepareOptions, *, records_seen: int, videos_seen: int, parts: int, todo: list[tuple[int, list]],
           results: list[PartResult], rejects: list[dict], kept_ids: list[str], num_entries: int, shard_bytes: int,
           start: float) -> dict:
    """What ``OUT/stats.json`` says of the job: counts, rejects by code, decoders used, bytes
    (source videos and shards), parts reused, speed, and a digest of the kept ids."""
    by_code: dict[str, int] = {}
    for r in rejects:
        by_code[r["code"]] = by_code.get(r["code"], 0) + 1
    backends: dict[str, int] = {}
    for res in results:
        for k, v in res.backends.items():
            backends[k] = backends.get(k, 0) + v
    seconds = time.perf_counter() - start
    source_bytes = sum(res.source_bytes for res in results)
    return {
        "records_seen": records_seen, "kept": len(kept_ids), "rejected": len(rejects),
        "videos_seen": videos_seen, "videos_kept": num_entries,
        "rejected_by_reason": dict(sorted(by_code.items())), "decoded_with": backends,
        "source_bytes": source_bytes, "shard_bytes": shard_bytes,
        "shard_to_source": round(shard_bytes / source_bytes, 4) if source_bytes else None,
        "parts": parts, "parts_reused": parts - len(todo), "workers": opts.workers,
        "seconds": round(seconds, 2), "videos_per_second": round(sum(len(v) for _, v in todo) / seconds, 2) if todo else None,
        "records": opts.records, "frames_validated": opts.frames, "store": opts.store,
        "shard_bytes_per_video": round(shard_bytes / num_entries) if num_entries else None,
        "id_digest": hashlib.sha256("\n".join(kept_ids).encode()).hexdigest()[:16],
    }


def prepare_rejected_records(folders: list[str]) -> int | None:
    """How many records ``prepare`` left out of the shard folders ``folders`` (the ``rejected`` of
    each one's ``stats.json``); None when a folder has no ``stats.json`` here to read (an
    object-store URL is not fetched for it)."""
    total = 0
    for folder in folders:
        path = os.path.join(folder, "stats.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            total += json.load(f)["rejected"]
    return total


def parse_args(argv=None) -> PrepareOptions:
    p = argparse.ArgumentParser(prog="python -m panda.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", action="append", required=True, help="a JSON list of records (repeat for several)")
    p.add_argument("--video-root", required=True, help="folder the records' 'video' paths are relative to")
    p.add_argument("--output", required=True, help="folder for the shards (then point data.root at it)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--frames", type=int, default=8, help="frames training samples per video (test-decoded)")
    p.add_argument("--sample-fps", type=float, default=1.0)
    p.add_argument("--min-frames", type=int, default=1,
                   help="reject videos with fewer frames (default 1: shorter clips are kept and padded, as the release does)")
    p.add_argument("--max-side", type=int, default=4096, help="reject frames with a longer side (pixels)")
    p.add_argument("--chunk-bytes", default="64MB", help="litdata chunk size")
    p.add_argument("--part-size", type=int, default=256, help="videos per resumable unit of work")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder: store text lengths in tokens")
    p.add_argument("--backend", default="auto", choices=["auto", "decord", "pyav", "torchcodec"])
    p.add_argument("--store", default="video", choices=["video", "frames"],
                   help="video: the encoded files (any frame setting later); frames: the sampled frames resized "
                        "for training (several times faster to read; tied to the settings below)")
    p.add_argument("--resolution", type=int, default=448, help="--store frames: STAB's stab.resolution")
    p.add_argument("--patch-size", type=int, default=14, help="--store frames: STAB's stab.patch_size")
    p.add_argument("--ratio", type=int, default=2, help="--store frames: STAB's stab.ratio")
    p.add_argument("--frame-format", default="png", choices=list(FRAME_FORMATS),
                   help="--store frames: png (lossless, the default) or jpeg (smaller; lossy, see --jpeg-quality)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--teacher-resolution", type=int, default=224,
                   help="--store frames: also store the distillation teacher's copy at this size (0: none)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return PrepareOptions(records=a.records, video_root=a.video_root, output=a.output, workers=a.workers,
                          resume=a.resume, frames=a.frames, sample_fps=a.sample_fps, min_frames=a.min_frames,
                          max_side=a.max_side, chunk_bytes=a.chunk_bytes, part_size=a.part_size,
                          tokenizer=a.tokenizer, backend=a.backend, progress=not a.no_progress, store=a.store,
                          resolution=a.resolution, patch_size=a.patch_size, ratio=a.ratio, frame_format=a.frame_format,
                          jpeg_quality=a.jpeg_quality, teacher_resolution=a.teacher_resolution or None)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = parse_args(argv)
    from panda.data import prepare as module  # the importable copy: spawn workers pickle its functions by name

    try:
        stats = module.prepare(opts)
    except (module.PandaError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: stats[k] for k in ("records_seen", "kept", "rejected", "rejected_by_reason", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
