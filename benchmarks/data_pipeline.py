"""Data-side numbers of panda's pipeline, measured in one process against baselines run alongside.

1. Videos/s per loader worker (one process, one thread) for decode + sample 8 frames +
   resize/pad/normalise at 448², on generated textured 640×360 clips (30 s at ≥ 2 Mb/s, and 5 s),
   for panda's pipeline (decord seek, one batched antialiased resize in torch) from a file and
   from shard bytes, against a straightforward per-frame PIL pipeline (same decoder and frame
   indices; per frame: PIL image, bicubic resize of the long side, paste on a mean-colour canvas,
   to float, normalise).
2. Padded fraction of tokens with random batches vs panda's length-grouped batches, on generated
   records whose text lengths follow Valley-like (short) and Video-ChatGPT-like (long) answers.
3. Shard size on disk vs the source videos (``python -m panda.data.prepare``).
4. Decoders side by side: decord, PyAV and TorchCodec, 8 frames sampled the release's
   way from 5 s, 30 s and 10 min clips, with 1 and 2 decoder threads, one process; the ratio to decord.
5. Frames stored once (``prepare --store frames``): videos/s per loader worker reading a stored
   entry vs decoding the shard's video bytes (both to the same training tensors, 30 s clips), the
   shard bytes per video for each format, and the pixel difference to decoding in grey levels.

    python benchmarks/data_pipeline.py [--long 3 --short 6 --workdir /tmp/panda_bench] [--only decoders,store]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from panda.data.datasets import FramePipeline
from panda.data.frames import CLIP_MEAN, CLIP_STD, frame_geometry, preprocess_frames
from panda.data.video import decode_video, sample_frame_indices

FRAMES, RES, PATCH = 8, 448, 14


def textured_clip(path: str, seconds: float, fps: int = 25, width: int = 640, height: int = 360, seed: int = 0) -> float:
    """A clip with camera-like motion over a detailed texture (scrolling noise at several scales
    plus moving blocks and sensor noise); returns its bitrate in Mb/s."""
    import av

    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, size=(height + 64, width * 2, 3), dtype=np.uint8)
    coarse = np.kron(rng.integers(0, 256, size=((height + 64) // 8, width // 4, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    texture = ((big.astype(np.uint16) + coarse[: big.shape[0], : big.shape[1]]) // 2).astype(np.uint8)
    n = int(seconds * fps)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "17", "g": str(fps * 2)}  # a 2 s GOP, as in web video
        for t in range(n):
            x, y = (3 * t) % width, int(16 + 12 * np.sin(t / 20))
            frame = texture[y: y + height, x: x + width].copy()
            bx = (7 * t) % (width - 80)
            frame[100:180, bx: bx + 80] = (255 * (t % 50 > 25), 128, 40)
            frame = np.clip(frame.astype(np.int16) + rng.integers(-6, 7, size=frame.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return os.path.getsize(path) * 8 / seconds / 1e6


def pil_pipeline(path: str) -> torch.Tensor:
    """The straightforward baseline: same decoder and indices, then per-frame PIL work."""
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    idx = sample_frame_indices(len(reader), reader.get_avg_fps(), FRAMES)
    return pil_preprocess(reader.get_batch(idx).asnumpy())


def pil_preprocess(frames: np.ndarray) -> torch.Tensor:
    from PIL import Image

    geo = frame_geometry(frames.shape[1], frames.shape[2], RES, PATCH)
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    fill = tuple(int(round(255 * m)) for m in CLIP_MEAN)
    out = []
    for arr in frames:
        img = Image.fromarray(arr).resize((geo.out_w, geo.out_h), Image.BICUBIC)
        canvas = Image.new("RGB", (RES, RES), fill)
        canvas.paste(img, (geo.left, geo.top))
        x = (np.asarray(canvas, dtype=np.float32) / 255.0 - mean) / std
        out.append(torch.from_numpy(x).permute(2, 0, 1))
    pixels = torch.zeros(FRAMES, 3, RES, RES)
    pixels[: len(out)] = torch.stack(out)
    return pixels


def seconds_per_call(fn, n: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def videos_per_second(fn, items, repeats: int = 2) -> float:
    fn(items[0])  # warm up (codec init, allocations)
    start = time.perf_counter()
    for _ in range(repeats):
        for item in items:
            fn(item)
    return repeats * len(items) / (time.perf_counter() - start)


def decode_speed(workdir: str, n_long: int, n_short: int) -> list[str]:
    torch.set_num_threads(1)  # one loader worker = one process with one thread
    lines = []
    for label, seconds, count in (("30 s", 30.0, n_long), ("5 s", 5.0, n_short)):
        paths, rates = [], []
        for i in range(count):
            path = os.path.join(workdir, f"clip_{label.replace(' ', '')}_{i}.mp4")
            rates.append(textured_clip(path, seconds, seed=i))
            paths.append(path)
        blobs = [open(p, "rb").read() for p in paths]
        panda = FramePipeline(FRAMES, RES, PATCH)
        a = videos_per_second(lambda p: panda(p), paths)
        b = videos_per_second(lambda d: panda(d, name="bytes"), blobs)
        c = videos_per_second(pil_pipeline, paths)
        same = (panda(paths[0])["pixels"] - pil_pipeline(paths[0])).abs().max().item()
        frames = decode_video(paths[0], FRAMES).frames
        t_panda = seconds_per_call(lambda: preprocess_frames(frames, FRAMES, RES, PATCH))
        t_pil = seconds_per_call(lambda: pil_preprocess(frames))
        t_dec = seconds_per_call(lambda: decode_video(paths[0], FRAMES), n=3)
        lines.append(f"{label} clips (640x360, {min(rates):.2f}-{max(rates):.2f} Mb/s, n={count}): "
                     f"panda file {a:.2f} videos/s | panda shard bytes {b:.2f} | per-frame PIL {c:.2f} | "
                     f"panda/PIL x{a / c:.2f} | max |panda - PIL| {same:.3f} (normalised units)")
        lines.append(f"  per video: decode 8 frames {1e3 * t_dec:.0f} ms; resize/pad/normalise panda {1e3 * t_panda:.1f} ms "
                     f"vs per-frame PIL {1e3 * t_pil:.1f} ms (x{t_pil / t_panda:.1f})")
    return lines


def padding(seed: int = 0, records: int = 20000, batch_size: int = 8, visual_tokens: int = 8 * 273) -> list[str]:
    from panda.data.sampling import EpochBatchSampler, SourceSpec

    rng = np.random.default_rng(seed)
    # Valley: one short exchange; Video-ChatGPT: long descriptive answers; ~7:1 as in the two sets
    valley = 14 + rng.lognormal(np.log(45), 0.6, size=int(records * 0.875))
    vcg = 16 + rng.lognormal(np.log(160), 0.5, size=records - len(valley))
    lengths = np.concatenate([valley, vcg]).astype(int) + 12  # template tokens
    rng.shuffle(lengths)

    def padded(batches, extra):
        tot = pad = 0
        for b in batches:
            ls = lengths[np.asarray(b)] + extra
            tot += ls.max() * len(ls)
            pad += (ls.max() - ls).sum()
        return pad / tot

    out = []
    for name, grouped in (("random batches", False), ("length-grouped", True)):
        sampler = EpochBatchSampler([SourceSpec("mix", len(lengths), list(range(len(lengths))), lengths.tolist())],
                                    batch_size, seed=seed, group_by_length=grouped, group_batches=32)
        batches = sampler.epoch_batches(0)
        out.append((name, padded(batches, 0), padded(batches, visual_tokens)))
    (_, text0, seq0), (_, text1, seq1) = out
    return [f"padding ({records} records, batch {batch_size}, median text {int(np.median(lengths))} tokens): "
            f"text tokens {text0:.1%} -> {text1:.1%} (x{text0 / max(text1, 1e-9):.1f} less); "
            f"whole LM sequence with {visual_tokens} visual tokens {seq0:.1%} -> {seq1:.1%}"]


def shard_size(workdir: str) -> list[str]:
    import json

    from panda.data.prepare import PrepareOptions, prepare

    videos = sorted(f for f in os.listdir(workdir) if f.startswith("clip_") and f.endswith(".mp4"))
    recs = []
    for i, v in enumerate(videos):  # two questions per video, as Video-ChatGPT has several
        for k in range(2):
            recs.append({"id": f"{i}_{k}", "video": v, "conversations": [
                {"from": "human", "value": "<video>\nDescribe the video."}, {"from": "gpt", "value": "Texture moves."}]})
    with open(os.path.join(workdir, "records.json"), "w") as f:
        json.dump(recs, f)
    out = os.path.join(workdir, "shards")
    shutil.rmtree(out, ignore_errors=True)
    stats = prepare(PrepareOptions(records=[os.path.join(workdir, "records.json")], video_root=workdir, output=out,
                                   workers=2, progress=False))
    return [f"shards: {stats['shard_bytes'] / 1e6:.1f} MB for {stats['source_bytes'] / 1e6:.1f} MB of source video "
            f"(x{stats['shard_to_source']:.4f}; {stats['kept']} records on {stats['videos_kept']} videos, each stored once); "
            f"prepare validated {stats['videos_per_second']} videos/s with 2 workers"]


def _clip(workdir: str, seconds: float, seed: int) -> str:
    path = os.path.join(workdir, f"decoders_{int(seconds)}s_{seed}.mp4")
    if not os.path.exists(path):
        textured_clip(path, seconds, seed=seed)
    return path


def decoders(workdir: str, n: int = 2) -> list[str]:
    """decord vs PyAV vs TorchCodec on the same clips and frame indices; ms per video (8 frames)."""
    from panda.data.video import torchcodec_available

    torch.set_num_threads(1)
    backends = ["decord", "pyav"] + ([] if torchcodec_available() else ["torchcodec"])
    lines = ["decoders: ms per video for 8 frames (release sampling), one process; x = decord's time / this one's"]
    lines.append(f"  {'clip':<8} {'threads':>7} " + " ".join(f"{b:>18}" for b in backends))
    for seconds, count in ((5.0, n), (30.0, n), (600.0, 1)):
        paths = [_clip(workdir, seconds, seed) for seconds, seed in [(seconds, i) for i in range(count)]]
        ref = decode_video(paths[0], FRAMES, backend="decord")
        for b in backends[1:]:  # the same frames, whichever decodes them
            other = decode_video(paths[0], FRAMES, backend=b)
            assert other.indices == ref.indices and np.abs(other.frames.astype(int) - ref.frames).mean() < 1.0, b
        for threads in (1, 2):
            times = {}
            for b in backends:
                repeats = 1 if seconds > 60 else 3
                times[b] = seconds_per_call(lambda: [decode_video(p, FRAMES, backend=b, threads=threads) for p in paths],
                                            n=repeats) / len(paths)
            label = f"{int(seconds)} s" if seconds < 60 else f"{int(seconds) // 60} min"
            lines.append(f"  {label:<8} {threads:>7} " + " ".join(
                f"{1e3 * times[b]:9.0f} ms x{times['decord'] / times[b]:5.2f}" for b in backends))
    if len(backends) < 3:
        lines.append(f"  torchcodec not measured: {torchcodec_available()}")
    return lines


def frame_store(workdir: str, n: int = 3) -> list[str]:
    """Reading ``prepare --store frames`` entries vs decoding the stored video, per loader worker."""
    import json

    from litdata import StreamingDataset

    from panda.data.frame_store import FrameStoreSpec, read_frames
    from panda.data.prepare import PrepareOptions, prepare

    torch.set_num_threads(1)
    paths = [_clip(workdir, 30.0, seed) for seed in range(n)]
    recs = [{"id": str(i), "video": os.path.basename(p), "conversations": [
        {"from": "human", "value": "<video>\nDescribe it."}, {"from": "gpt", "value": "Texture moves."}]} for i, p in enumerate(paths)]
    with open(os.path.join(workdir, "store_records.json"), "w") as f:
        json.dump(recs, f)
    pipeline = FramePipeline(FRAMES, RES, PATCH, teacher_resolution=224)
    stores = [("video", {}), ("png", dict(frame_format="png")), ("jpeg q100", dict(frame_format="jpeg", jpeg_quality=100)),
              ("jpeg q95", dict(frame_format="jpeg", jpeg_quality=95)), ("jpeg q90", dict(frame_format="jpeg", jpeg_quality=90))]
    grey = 255 * torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    lines = [f"frames stored once: 30 s clips (640x360, n={n}), {FRAMES} frames at {RES} px + the teacher's copy at 224 px, "
             "one process, one thread (a loader worker)"]
    decoded = None
    for name, kw in stores:
        out = os.path.join(workdir, "store_" + name.replace(" ", "_"))
        shutil.rmtree(out, ignore_errors=True)
        stats = prepare(PrepareOptions(records=[os.path.join(workdir, "store_records.json")], video_root=workdir, output=out,
                                       frames=FRAMES, progress=False, store="video" if name == "video" else "frames", **kw))
        ds = StreamingDataset(out)
        entries = [(json.loads(ds[i]["meta"]), bytes(ds[i]["frames" if kw else "video"])) for i in range(len(ds))]
        if not kw:
            def read(entry):
                return pipeline(entry[1], name=entry[0]["video"])
        else:
            spec = FrameStoreSpec(**json.load(open(os.path.join(out, "panda_index.json")))["frame_store"])

            def read(entry, spec=spec):
                return read_frames(entry[1], entry[0]["frame_store"], spec, with_teacher=True)
        rate = videos_per_second(read, entries, repeats=3)
        tensors = [read(e) for e in entries]
        if decoded is None:
            decoded, base_rate = tensors, rate
            lines.append(f"  {name:<10} {rate:7.2f} videos/s   x1.00   {stats['shard_bytes_per_video'] / 1e3:8.0f} kB/video "
                         "(the encoded file)")
            continue
        diffs = torch.cat([((a["pixels"] - b["pixels"]) * grey).abs()[a["frame_mask"][:, None].expand_as(a["pixels"]) > 0]
                           for a, b in zip(decoded, tensors)])
        lines.append(f"  {name:<10} {rate:7.2f} videos/s   x{rate / base_rate:5.2f}   {stats['shard_bytes_per_video'] / 1e3:8.0f} "
                     f"kB/video   |difference to decoding| mean {diffs.mean():.2f}, p99 {diffs.quantile(0.99):.2f}, "
                     f"max {diffs.max():.1f} grey levels")
    return lines


SECTIONS = ("decode", "padding", "shards", "decoders", "store")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--long", type=int, default=3)
    p.add_argument("--short", type=int, default=6)
    p.add_argument("--workdir", default=None)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    a = p.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="panda_bench_")
    os.makedirs(workdir, exist_ok=True)
    only = set(a.only.split(","))
    runs = {"decode": lambda: decode_speed(workdir, a.long, a.short), "padding": padding,
            "shards": lambda: shard_size(workdir), "decoders": lambda: decoders(workdir),
            "store": lambda: frame_store(workdir)}
    for section in SECTIONS:
        if section in only:
            for line in runs[section]():
                print(line, flush=True)


if __name__ == "__main__":
    main()
