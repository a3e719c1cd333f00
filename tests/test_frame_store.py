"""Frames stored once (``prepare --store frames``): the same pixels as decoding (PNG)
or within stated grey levels (JPEG), a clear error for other frame settings, training reads it."""

import json
import os

import pytest
import torch

from conftest import train_tiny
from panda.constants import CLIP_STD
from panda.data.datasets import FramePipeline
from panda.data.frame_store import FrameStoreMismatch
from panda.data.prepare import PrepareOptions, prepare


def _prepare(root, out, **kw):
    return prepare(PrepareOptions(records=[os.path.join(root, "train", "train_json", "synthetic_train.json")],
                                  video_root=os.path.join(root, "train"), output=out, frames=4, part_size=16,
                                  progress=False, **kw))


@pytest.fixture(scope="module")
def stores(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("stores")
    out = {"video": str(base / "video"), "png": str(base / "png"), "jpeg": str(base / "jpeg")}
    _prepare(synthetic_root, out["video"])
    geometry = dict(resolution=56, patch_size=14, ratio=2, teacher_resolution=28)
    _prepare(synthetic_root, out["png"], store="frames", frame_format="png", **geometry)
    _prepare(synthetic_root, out["jpeg"], store="frames", frame_format="jpeg", jpeg_quality=95, **geometry)
    return out


def _dataset(path, tokenizer, pipeline):
    from panda.data.conversation import get_template
    from panda.data.shards import ShardDataset, ShardSource

    return ShardDataset([ShardSource.open("s", path)], tokenizer, get_template("vicuna_v1"), pipeline, 4096, 64)


PIPELINE = FramePipeline(4, 56, 14, 2, teacher_resolution=28)


def test_png_frames_equal_decoding_and_jpeg_stays_within_a_few_grey_levels(stores, tokenizer):
    decoded = _dataset(stores["video"], tokenizer, PIPELINE)
    png = _dataset(stores["png"], tokenizer, PIPELINE)
    jpeg = _dataset(stores["jpeg"], tokenizer, PIPELINE)
    assert len(decoded) == len(png) == len(jpeg) > 8
    grey = 255 * torch.tensor(CLIP_STD).view(1, 3, 1, 1)  # one grey level in normalised units, per channel
    worst_mean = 0.0
    for i in range(0, len(decoded), 3):
        a, b, c = decoded[i], png[i], jpeg[i]
        assert a["id"] == b["id"] == c["id"] and torch.equal(a["input_ids"], b["input_ids"])
        for key in ("pixels", "frame_mask", "teacher_pixels", "teacher_mask"):
            assert torch.equal(a[key], b[key]), key  # lossless: exactly the decode path's tensor
        assert torch.equal(a["frame_mask"], c["frame_mask"])
        levels = ((a["pixels"] - c["pixels"]) * grey).abs()[a["frame_mask"][:, None].expand_as(a["pixels"]) > 0]
        worst_mean = max(worst_mean, float(levels.mean()))
    assert 0 < worst_mean <= 3.0  # JPEG q95 (4:4:4) is lossy, and close (2.4 levels on these sharp-edged 56 px frames)


def test_frame_store_sizes_and_stats(stores):
    video = json.load(open(os.path.join(stores["video"], "stats.json")))
    png = json.load(open(os.path.join(stores["png"], "stats.json")))
    jpeg = json.load(open(os.path.join(stores["jpeg"], "stats.json")))
    assert png["store"] == "frames" and video["store"] == "video"
    assert png["kept"] == video["kept"] and png["videos_kept"] == video["videos_kept"]
    assert 0 < jpeg["shard_bytes_per_video"] and 0 < png["shard_bytes_per_video"]
    index = json.load(open(os.path.join(stores["png"], "panda_index.json")))
    assert index["frame_store"]["frames"] == 4 and index["frame_store"]["teacher_resolution"] == 28


@pytest.mark.parametrize("pipeline, named", [
    (FramePipeline(2, 56, 14, 2, teacher_resolution=28), "frames: stored 4, the run asks 2"),
    (FramePipeline(4, 112, 14, 2, teacher_resolution=28), "resolution: stored 56, the run asks 112"),
    (FramePipeline(4, 56, 14, 2, sample_fps=2.0, teacher_resolution=28), "sample_fps: stored 1.0, the run asks 2.0"),
    (FramePipeline(4, 56, 14, 2, teacher_resolution=56), "teacher_resolution: stored 28, the run asks 56"),
])
def test_other_frame_settings_are_refused_naming_the_setting_and_the_fix(stores, tokenizer, pipeline, named):
    with pytest.raises(FrameStoreMismatch) as err:
        _dataset(stores["png"], tokenizer, pipeline)
    assert named in str(err.value) and "--store frames" in str(err.value) and stores["png"] in str(err.value)
    # without a teacher the stored teacher copy is simply not read
    sample = _dataset(stores["png"], tokenizer, FramePipeline(4, 56, 14, 2))[0]
    assert "teacher_pixels" not in sample and sample["pixels"].shape == (4, 3, 56, 56)


def test_a_damaged_stored_frame_is_skipped_and_named(synthetic_root, tmp_path, tokenizer):
    out = str(tmp_path / "png")
    _prepare(synthetic_root, out, store="frames", frame_format="png", resolution=56, patch_size=14, ratio=2,
             teacher_resolution=0)
    ds = _dataset(out, tokenizer, FramePipeline(4, 56, 14, 2))
    meta = json.loads(ds._stream(0)[0]["meta"])
    chunk = os.path.join(out, json.load(open(os.path.join(out, "index.json")))["chunks"][0]["filename"])
    data = bytearray(open(chunk, "rb").read())
    start = data.find(b"\x89PNG")  # the first stored frame of the first entry
    data[start + 40: start + 200] = bytes(160)
    open(chunk, "wb").write(bytes(data))
    ds = _dataset(out, tokenizer, FramePipeline(4, 56, 14, 2))
    bad = ds[0]
    assert "error" in bad and "stored frames unreadable" in bad["error"]["reason"] and meta["video"] in bad["error"]["path"]


def test_training_reads_a_frame_store(stores, synthetic_root, tmp_path):
    summary = train_tiny(synthetic_root, tmp_path / "run", "frames=4", "stab.resolution=56", "trainer.max_steps=3",
                         "evaluate=false", f"data.shards=[{{name: syn, path: {stores['png']}}}]", "teacher=none")
    assert summary["train/steps"] == 3 and summary["train/skipped_samples"] == 0
    with pytest.raises(FrameStoreMismatch, match="resolution: stored 56, the run asks 112"):
        train_tiny(synthetic_root, tmp_path / "run2", "frames=4", "stab.resolution=112", "trainer.max_steps=1",
                   "evaluate=false", f"data.shards=[{{name: syn, path: {stores['png']}}}]", "teacher=none")
