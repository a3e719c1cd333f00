"""A folder of real good and bad videos, and records pointing at them (the issue-3 bad-video zoo).

``build_zoo(root)`` writes the videos with PyAV and returns ``(records, expected)``: the records
(as JSON objects, some malformed on purpose) and, per record id, the reject code ``prepare``
must give it (``None``: kept).
"""

from __future__ import annotations

import json
import os

import av
import numpy as np

from panda.data.synthetic import write_video


def _frames(n, width=64, height=48, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 3 * t, axis=1) for t in range(n)])


def _vfr(path, n=12):
    """H.264 with irregular timestamps (variable frame rate)."""
    from fractions import Fraction

    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = Fraction(1, 1000)
        t = 0
        for i, arr in enumerate(_frames(n, seed=3)):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += 33 if i % 3 else 120
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _audio_only(path):
    with av.open(path, "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _faststart(path, n=48):
    """An MP4 with its index first, so a copy cut short still opens (and then runs out of frames)."""
    with av.open(path, "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"crf": "10", "preset": "ultrafast", "g": "4"}
        for arr in _frames(n, seed=5):
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def build_zoo(root: str, frames: int = 4) -> tuple[list[dict], dict[str, str | None]]:
    vids = os.path.join(root, "videos")
    os.makedirs(vids, exist_ok=True)
    expected: dict[str, str | None] = {}
    records: list = []

    def rec(rid, video, code, question="<video>\nWhat happens?", answer="Something moves."):
        records.append({"id": rid, "video": video, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}], "source_site": "zoo"})
        expected[rid] = code

    n = 2 * frames + 4
    write_video(f"{vids}/good.mp4", _frames(n, seed=1), fps=8)
    rec("good", "good.mp4", None)
    write_video(f"{vids}/good2.mp4", _frames(n, seed=2), fps=8)
    rec("good2", "good2.mp4", None, answer="A longer answer: " + "the texture slides to the right. " * 6)
    write_video(f"{vids}/av1.mp4", _frames(n, width=64, height=64, seed=4), fps=8, codec="libsvtav1", options={"preset": "12"})
    rec("av1", "av1.mp4", None)  # decord cannot decode AV1: kept through PyAV
    write_video(f"{vids}/vp9.webm", _frames(n, seed=6), fps=8, codec="libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"})
    rec("vp9", "vp9.webm", None)
    write_video(f"{vids}/hevc.mp4", _frames(n, seed=7), fps=8, codec="libx265", options={"preset": "ultrafast", "x265-params": "log-level=error"})
    rec("hevc", "hevc.mp4", None)
    write_video(f"{vids}/anim.gif", _frames(n, seed=8), fps=8, codec="gif")
    rec("gif", "anim.gif", None)
    _vfr(f"{vids}/vfr.mp4")
    rec("vfr", "vfr.mp4", None)

    rec("missing", "not_there.mp4", "missing")
    open(f"{vids}/empty.mp4", "wb").close()
    rec("empty", "empty.mp4", "empty_file")
    with open(f"{vids}/garbage.mp4", "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 255, 20000, dtype=np.uint8).tobytes())
    rec("garbage", "garbage.mp4", "unreadable")
    _faststart(f"{vids}/full.mp4")
    data = open(f"{vids}/full.mp4", "rb").read()
    with open(f"{vids}/truncated.mp4", "wb") as f:
        f.write(data[: len(data) // 3])
    rec("truncated", "truncated.mp4", "truncated")
    _audio_only(f"{vids}/audio.m4a")
    rec("audio", "audio.m4a", "no_video_stream")
    write_video(f"{vids}/short.mp4", _frames(max(1, frames - 2), seed=9), fps=8)
    rec("short", "short.mp4", None)  # kept: padded at training time, as the release pads
    write_video(f"{vids}/wide.mp4", _frames(2 * frames, width=4352, height=32, seed=10), fps=8)
    rec("huge", "wide.mp4", "frame_too_large")

    rec("dup", "good.mp4", None)
    rec("dup", "good2.mp4", "duplicate_id#2")  # the second record with this id
    records.append({"id": "noconv", "video": "good.mp4", "conversations": []})
    expected["noconv"] = "empty_conversation"
    records.append({"id": "blank", "video": "good.mp4", "conversations": [
        {"from": "human", "value": "<video>\n  "}, {"from": "gpt", "value": ""}]})
    expected["blank"] = "empty_conversation"
    records.append({"id": "badrec", "video": 7, "conversations": []})
    expected["badrec"] = "malformed_record"
    records.append("NONUTF8")  # placeholder: replaced by raw bytes below
    expected["latin1"] = "non_utf8_text"
    return records, expected


def write_records(path: str, records: list) -> None:
    """JSON list; the ``"NONUTF8"`` entry becomes a record whose question holds Latin-1 bytes."""
    parts = []
    for r in records:
        if r == "NONUTF8":
            parts.append(b'{"id": "latin1", "video": "good.mp4", "conversations": [{"from": "human", "value": '
                         b'"<video>\\nQu\xe9 pasa?"}, {"from": "gpt", "value": "Nada."}]}')
        else:
            parts.append(json.dumps(r).encode())
    with open(path, "wb") as f:
        f.write(b"[\n" + b",\n".join(parts) + b"\n]")
