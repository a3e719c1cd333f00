"""Real data at scale: prepare (bad-video zoo, workers, resume), streaming shards (rank × worker
split, mixtures, object-store path), corrupt entries at train time, mid-epoch resume."""

import dataclasses
import json
import os
import shutil

import pytest
import torch

from conftest import compose, run_cli, tiny_overrides
from panda.data.prepare import PrepareError, PrepareOptions, prepare
from panda.errors import RecordError
from video_zoo import build_zoo, write_records


def read_shards(path):
    from litdata import StreamingDataset

    ds = StreamingDataset(path)
    return [(json.loads(ds[i]["meta"]), bytes(ds[i]["video"])) for i in range(len(ds))]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("zoo"))
    records, expected = build_zoo(root, frames=4)
    write_records(os.path.join(root, "records.json"), records)
    return root, expected


def zoo_options(root, out, **kw):
    return PrepareOptions(records=[os.path.join(root, "records.json")], video_root=os.path.join(root, "videos"),
                          output=out, frames=4, part_size=4, progress=False, **kw)


def test_prepare_sorts_the_bad_video_zoo(zoo, tmp_path):
    root, expected = zoo
    out = str(tmp_path / "out")
    stats = prepare(zoo_options(root, out, workers=2))
    rejects = [json.loads(line) for line in open(os.path.join(out, "rejects.jsonl"))]
    got = {}
    for r in rejects:
        got.setdefault(r["id"], []).append(r["code"])
        assert r["reason"]
    want = {rid: code.split("#")[0] for rid, code in expected.items() if code}
    assert {rid: codes[0] for rid, codes in got.items()} == want  # each bad record, with its own reason
    assert all(len(codes) == 1 for codes in got.values())
    assert {r["path"] for r in rejects if r["code"] == "missing"} == {os.path.join(root, "videos", "not_there.mp4")}
    missing = next(r for r in rejects if r["code"] == "missing")
    assert "--video-root" in missing["reason"] and "data.video_root" not in missing["reason"]
    assert all(r["source"] and "records.json#" in r["source"] for r in rejects)  # video rejects too: file#index
    assert all(r["source"].endswith(f"records.json#{i}") for i, r in
               [(18, next(r for r in rejects if r["id"] == "badrec"))])  # record rejects name file and index

    kept = read_shards(out)
    kept_ids = [r["id"] for m, _ in kept for r in m["records"]]
    # of the two records with id "dup" the first is kept
    assert sorted(kept_ids) == sorted(rid for rid, code in expected.items() if code is None or code.endswith("#2"))
    for meta, data in kept:  # the shard holds the source file's bytes, untouched, once per video
        assert data == open(os.path.join(root, "videos", meta["video"]), "rb").read()
        assert meta["num_frames"] >= (2 if meta["video"] == "short.mp4" else 4) and meta["width"] > 0 and meta["fps"] > 0 and meta["records"][0]["turns"]
    assert len({m["video"] for m, _ in kept}) == len(kept)
    by_id = {r["id"]: m | r for m, _ in kept for r in m["records"]}
    assert by_id["dup"]["video"] == "good.mp4" and len(by_id["good"]["records"]) == 2  # stored with "good"
    assert by_id["av1"]["backend"] == "pyav" and by_id["av1"]["codec"] in ("libdav1d", "av1")  # decord cannot
    assert by_id["hevc"]["codec"] == "hevc" and by_id["vp9"]["codec"] == "vp9" and by_id["gif"]["codec"] == "gif"
    assert by_id["good"]["extra"] == {"source_site": "zoo"}  # unknown fields are kept as metadata
    assert by_id["good2"]["text_length"] > by_id["good"]["text_length"]

    assert stats["records_seen"] == len(expected) + 1 and stats["kept"] == len(kept_ids)  # + the second "dup"
    assert stats["videos_kept"] == len(kept)
    assert stats["rejected"] == len(rejects) == sum(stats["rejected_by_reason"].values())
    assert stats["decoded_with"]["pyav"] >= 1 and stats["parts"] == 4 and stats["shard_bytes"] > stats["source_bytes"] * 0.99
    index = json.load(open(os.path.join(out, "panda_index.json")))
    assert index["num_entries"] == len(kept) and index["num_records"] == len(kept_ids) == len(index["lengths"])


def test_prepare_resume_redoes_only_unfinished_parts(zoo, tmp_path):
    root, _ = zoo
    out = str(tmp_path / "out")
    first = prepare(zoo_options(root, out))
    before = read_shards(out)
    # an interruption inside part 1: its marker not yet written, a chunk half written, no final index
    os.remove(os.path.join(out, ".parts", "1.json"))
    chunk = next(f for f in os.listdir(out) if f.startswith("chunk-1-"))
    with open(os.path.join(out, chunk), "r+b") as f:
        f.truncate(100)
    for name in ("index.json", "stats.json", "panda_index.json"):
        os.remove(os.path.join(out, name))

    with pytest.raises(PrepareError, match="--resume"):
        prepare(zoo_options(root, out))  # no silent overwrite
    with pytest.raises(PrepareError, match="part_size"):
        prepare(dataclasses.replace(zoo_options(root, out, resume=True), part_size=3))  # a different plan
    again = prepare(zoo_options(root, out, resume=True))
    assert again["parts_reused"] == first["parts"] - 1
    assert again["id_digest"] == first["id_digest"] and again["kept"] == first["kept"]
    assert read_shards(out) == before


def test_malformed_json_names_the_file_and_record_index(tmp_path):
    from panda.data.records import load_records

    path = tmp_path / "valley_.json"
    good = {"id": "a", "video": "a.mp4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]}
    path.write_text(json.dumps([good, good | {"id": "b"}])[:-1].replace('"id": "b"', '"id": "b",,') + "]")
    with pytest.raises(RecordError, match=r"valley_\.json, record 1: invalid JSON at line 1"):
        load_records(path)
    (tmp_path / "videos").mkdir()
    proc = run_cli(["-m", "panda.data.prepare", "--records", str(path), "--video-root", str(tmp_path / "videos"),
                    "--output", str(tmp_path / "out"), "--no-progress"], check=False)
    assert proc.returncode == 2 and "valley_.json, record 1: invalid JSON" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written: the same command can simply run again


def test_a_prepare_that_fails_before_finishing_a_part_leaves_the_output_as_it_found_it(tmp_path, make_video):
    (tmp_path / "videos").mkdir()
    make_video("videos/a.mp4")
    turns = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A circle."}]
    good = [{"id": "a", "video": "a.mp4", "conversations": turns}, {"id": "b", "video": "a.mp4", "conversations": turns}]
    records = tmp_path / "valley_.json"
    records.write_text(json.dumps(good)[:-1] + ",]")  # a trailing comma
    out = tmp_path / "out"
    opts = PrepareOptions(records=[str(records)], video_root=str(tmp_path / "videos"), output=str(out), frames=4,
                          progress=False)
    with pytest.raises(RecordError, match=r"valley_\.json, record 2: invalid JSON"):
        prepare(opts)
    assert not out.exists()
    records.write_text(json.dumps(good))
    assert prepare(opts)["kept"] == 2  # the same command, without --resume

    # a failure inside the first part (litdata refuses the chunk size), in a folder that was empty
    empty = tmp_path / "empty"
    empty.mkdir()
    failing = dataclasses.replace(opts, output=str(empty), chunk_bytes="lots")
    with pytest.raises(ValueError, match="units"):
        prepare(failing)
    assert empty.is_dir() and os.listdir(empty) == []
    assert prepare(dataclasses.replace(failing, chunk_bytes="64MB"))["kept"] == 2


def two_video_job(tmp_path, make_video, **kw):
    (tmp_path / "videos").mkdir()
    make_video("videos/a.mp4")
    make_video("videos/b.mp4", seed=1)
    turns = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A circle."}]
    records = tmp_path / "valley_.json"
    records.write_text(json.dumps([{"id": v, "video": f"{v}.mp4", "conversations": turns} for v in ("a", "b")]))
    return PrepareOptions(records=[str(records)], video_root=str(tmp_path / "videos"), output=str(tmp_path / "out"),
                          frames=4, progress=False, **kw)


def test_a_bug_while_preparing_stops_the_job_instead_of_rejecting_the_video(tmp_path, make_video, monkeypatch):
    """Only what a video can cause (it does not decode, or cannot be read) is a reject; a bug in
    panda stops the job with its own traceback and leaves the output as it found it."""
    from panda.data import prepare as module

    opts = two_video_job(tmp_path, make_video)
    made = module.make_sample

    def unreadable_b(video, records, opts):
        if video == "b.mp4":
            raise PermissionError(13, "Permission denied", video)
        return made(video, records, opts)

    monkeypatch.setattr(module, "make_sample", unreadable_b)
    stats = prepare(opts)
    assert stats["kept"] == 1 and stats["rejected_by_reason"] == {"unreadable": 1}
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["id"] == "b" and "cannot read the file: PermissionError" in reject["reason"]

    def bug(turns, tokenizer_path):
        raise KeyError("a bug in panda")

    monkeypatch.setattr(module, "text_length", bug)
    again = dataclasses.replace(opts, output=str(tmp_path / "again"))
    with pytest.raises(KeyError, match="a bug in panda"):
        prepare(again)
    assert not (tmp_path / "again").exists()


def test_a_tokenizer_that_does_not_load_is_the_jobs_error(tmp_path, make_video):
    opts = two_video_job(tmp_path, make_video, tokenizer=str(tmp_path / "no_tokenizer_here"))
    with pytest.raises(PrepareError, match="--tokenizer .*no_tokenizer_here: no tokenizer loads from it"):
        prepare(opts)
    assert not (tmp_path / "out").exists()  # refused before anything is written


# --- streaming ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_shards(synthetic_root, tmp_path_factory):
    """The session's synthetic training records, prepared into shards in several chunks."""
    out = str(tmp_path_factory.mktemp("shards") / "synthetic")
    prepare(PrepareOptions(records=[os.path.join(synthetic_root, "train", "train_json", "synthetic_train.json")],
                           video_root=os.path.join(synthetic_root, "train"), output=out, frames=4,
                           chunk_bytes="40kb", part_size=16, progress=False,
                           tokenizer=os.path.join(synthetic_root, "tokenizer")))
    return out


def shard_dataset(paths, tokenizer):
    from panda.data.conversation import get_template
    from panda.data.datasets import FramePipeline
    from panda.data.shards import ShardDataset, ShardSource

    sources = [ShardSource.open(f"s{i}", p) for i, p in enumerate(paths)]
    return ShardDataset(sources, tokenizer, get_template("vicuna_v1"), FramePipeline(4, 56, 14), 4096, 64)


def test_shards_split_across_two_ranks_and_two_workers_read_every_sample_once(synthetic_shards, tokenizer):
    from panda.data.datamodule import make_loader
    from panda.data.sampling import EpochBatchSampler, Positioned, SourceSpec

    for path in (synthetic_shards, f"local:{synthetic_shards}"):  # a local folder, and the object-store code path
        ds = shard_dataset([path], tokenizer)
        src = ds.sources[0]
        assert len(src.chunk_sizes) > 3  # the order really is chunk-aware
        n = src.num_records
        assert n > src.num_entries  # several questions per video, each video stored once
        batch = next(b for b in (4, 3, 2, 1) if n % (2 * b) == 0)  # no pad batch: each sample exactly once
        seen = []
        for rank in range(2):
            sampler = EpochBatchSampler([SourceSpec("s", n, src.record_chunks(), src.lengths)], batch, seed=1,
                                        rank=rank, world=2, shuffle_window=8)
            loader = make_loader(Positioned(ds), batch, 2, tokenizer.pad_token_id, sampler)
            for b in loader:
                assert not b["skipped"] and b["pixels"].shape[1:] == (4, 3, 56, 56)
                seen += b["ids"]
        ids = [r["id"] for m, _ in read_shards(synthetic_shards) for r in m["records"]]
        assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen)) == n


def test_mixture_weights_are_respected(synthetic_shards, zoo, tmp_path, tokenizer):
    from panda.data.sampling import EpochBatchSampler, SourceSpec
    from panda.data.shards import ShardSource

    root, _ = zoo
    small = str(tmp_path / "zoo")
    prepare(zoo_options(root, small))
    a, b = ShardSource.open("a", synthetic_shards), ShardSource.open("b", small)
    specs = [SourceSpec("a", a.num_records, a.record_chunks(), a.lengths, 0.75),
             SourceSpec("b", b.num_records, b.record_chunks(), b.lengths, 0.25)]
    na, nb = a.num_records, b.num_records
    total = 4 * (na + nb)
    sampler = EpochBatchSampler(specs, 4, seed=0, samples_per_epoch=total)
    for epoch in range(2):
        flat = [i for batch in sampler.epoch_batches(epoch) for i in batch]
        from_b = [i for i in flat if i >= na]
        assert abs(len(from_b) / len(flat) - 0.25) < 0.02
        counts = torch.bincount(torch.tensor(from_b) - na, minlength=nb)
        assert counts.max() - counts.min() <= 1  # the small source repeats evenly, in fresh orders
        first = [j >= na for j in flat[: len(flat) // 2]]
        assert 0.15 < sum(first) / len(first) < 0.35  # interleaved through the epoch, not appended
    # every batch comes from one source
    assert all(len({i >= na for i in batch}) == 1 for batch in sampler.epoch_batches(0))

    # the same through the config group and the DataModule: data=valley+videochatgpt under one root
    from panda.build import build_datamodule
    from panda.config import to_train_config

    root = tmp_path / "mix"
    root.mkdir()
    os.symlink(synthetic_shards, root / "valley")
    os.symlink(small, root / "videochatgpt")
    cfg = compose(["data=valley+videochatgpt", f"data.root={root}", "data.shards.0.weight=0.75",
                   "data.shards.1.weight=0.25", f"data.samples_per_epoch={total}", "data.num_workers=0",
                   "data.batch_size=4", "stab.width=32"])
    dm = build_datamodule(to_train_config(cfg), tokenizer)
    dm.setup("fit")
    batches = list(dm.train_dataloader().batch_sampler)
    flat = [i for batch in batches for i, _, _ in batch]
    assert len(flat) == total and abs(sum(i >= na for i in flat) / total - 0.25) < 0.02


def shard_overrides(synthetic_root, shards, run_dir, *extra):
    return compose(tiny_overrides(synthetic_root, str(run_dir)) + [
        f"data.shards=[{{name: synthetic, path: '{shards}'}}]", "evaluate=false", *extra])


def test_corrupt_shard_entry_is_skipped_counted_and_named_at_train_time(synthetic_shards, synthetic_root, tmp_path, caplog):
    from panda.training.run import train

    broken = str(tmp_path / "broken")
    shutil.copytree(synthetic_shards, broken)
    meta, data = read_shards(broken)[5]
    chunk_files = sorted(f for f in os.listdir(broken) if f.startswith("chunk-"))
    for name in chunk_files:  # find the entry's bytes and wreck the container structure in place
        blob = bytearray(open(os.path.join(broken, name), "rb").read())
        at = blob.find(data)
        if at >= 0:
            for tag in (b"ftyp", b"moov", b"mdat"):
                pos = blob.find(tag, at, at + len(data))
                if pos >= 0:
                    blob[pos: pos + 4] = b"XXXX"
            open(os.path.join(broken, name), "wb").write(bytes(blob))
            break
    else:
        pytest.fail("entry bytes not found in any chunk")
    caplog.set_level("WARNING")
    summary = train(shard_overrides(synthetic_root, broken, tmp_path / "run", "trainer.max_epochs=2", "data.num_workers=2"))
    users = [r["id"] for r in meta["records"]]  # the records asking about this video
    assert summary["train/skipped_samples"] == 2 * len(users)  # each once per epoch, never replaced by another sample
    named = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(named) == 2 * len(users) and all(f"{broken}#5 ({meta['video']})" in m for m in named)
    assert sorted(m.split()[2] for m in named) == sorted(users * 2)
    assert 0.0 <= summary["train/padded_fraction_mean"] < 0.5
    assert 0.0 <= summary["train/padded_fraction_all_mean"] < 1.0


def test_training_on_shards_reports_the_records_prepare_left_out(synthetic_root, tmp_path):
    from panda.training.run import train

    records = json.load(open(os.path.join(synthetic_root, "train", "train_json", "synthetic_train.json")))[:8]
    records += [{"id": "no_video"},  # malformed_record
                records[0] | {"id": "gone", "video": "synthetic/not_there.mp4"},  # missing
                records[1]]  # duplicate_id
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    shards = str(tmp_path / "shards")
    stats = prepare(PrepareOptions(records=[str(path)], video_root=os.path.join(synthetic_root, "train"), output=shards,
                                   frames=4, progress=False, tokenizer=os.path.join(synthetic_root, "tokenizer")))
    assert stats["rejected"] == 3
    summary = train(shard_overrides(synthetic_root, shards, tmp_path / "run", "trainer.max_steps=1"))
    assert summary["data/prepare_rejected_records"] == 3 == summary["data/prepare_rejected_records/synthetic"]
    assert summary["data/rejected_records"] == 0  # training itself read no record file
    assert summary["data/source_share/synthetic"] == 1.0 and summary["data/source_samples/synthetic"] == 4


def test_mid_epoch_resume_on_shards_matches_an_uninterrupted_run(synthetic_shards, synthetic_root, tmp_path):
    from panda.training.run import train

    common = ["trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=1000", "stage.schedule=constant",
              "stage.warmup_ratio=0", "data.num_workers=2", "data.shuffle_window=8"]
    straight = train(shard_overrides(synthetic_root, synthetic_shards, tmp_path / "straight", "trainer.max_steps=9", *common))
    train(shard_overrides(synthetic_root, synthetic_shards, tmp_path / "split", "trainer.max_steps=3", *common))
    resumed = train(shard_overrides(synthetic_root, synthetic_shards, tmp_path / "split", "trainer.max_steps=9",
                                    "resume=last", *common))
    assert [s for s, _ in resumed["train/loss_by_step"]] == list(range(1, 10))
    assert resumed["train/loss_by_step"] == straight["train/loss_by_step"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["epoch"] >= 1  # crossed an epoch boundary after the resume
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.parametrize("source", ["shards", "records"])
@pytest.mark.parametrize("first", [["trainer.max_epochs=1", "trainer.max_steps=100"],  # stops at the epoch's end
                                   ["trainer.max_epochs=3", "trainer.max_steps=3"]])  # the step limit lands on it
def test_resume_from_a_checkpoint_at_the_end_of_an_epoch_matches_an_uninterrupted_run(source, first, synthetic_shards,
                                                                                      synthetic_root, tmp_path):
    """A checkpoint written when an epoch closed resumes at the next epoch's first batch and trains all of it."""
    from panda.training.run import train

    def run(run_dir, *extra):
        data = [f"data.shards=[{{name: synthetic, path: '{synthetic_shards}'}}]"] if source == "shards" else []
        return train(compose(tiny_overrides(synthetic_root, str(run_dir)) + data + [
            "evaluate=false", "data.batch_size=16", "data.num_workers=2", "stage.schedule=constant",
            "stage.warmup_ratio=0", "trainer.checkpoint_every_n_steps=1000", *extra]))

    rest = ["trainer.max_epochs=3", "trainer.max_steps=100"]
    straight = run(tmp_path / "straight", *rest)
    split = run(tmp_path / "split", *first)
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)
    per_epoch = len(straight["train/loss_by_step"]) // 3
    assert ckpt["VideoDataModule"] == {"epoch": 0, "batches_done": per_epoch} == {"epoch": 0, "batches_done": split["train/steps"]}
    resumed = run(tmp_path / "split", *rest, "resume=last")
    assert per_epoch >= 2 and len(resumed["train/loss_by_step"]) == 3 * per_epoch  # no batch dropped
    assert resumed["train/loss_by_step"] == straight["train/loss_by_step"]


@pytest.mark.slow
def test_ddp_resume_from_an_end_of_epoch_checkpoint_on_shards_matches_an_uninterrupted_run(synthetic_shards, synthetic_root,
                                                                                          tmp_path):
    def run(run_dir, *extra):
        run_cli(["train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}",
                 *tiny_overrides(synthetic_root), f"data.shards=[{{name: synthetic, path: '{synthetic_shards}'}}]",
                 "evaluate=false", "data.batch_size=8", "stage.schedule=constant", "stage.warmup_ratio=0",
                 "trainer.max_steps=100", *extra])
        return json.loads((run_dir / "summary.json").read_text())

    straight = run(tmp_path / "straight", "trainer.max_epochs=3")
    first = run(tmp_path / "split", "trainer.max_epochs=1")
    resumed = run(tmp_path / "split", "trainer.max_epochs=3", "resume=last")
    assert first["train/steps"] >= 2 and len(straight["train/loss_by_step"]) == 3 * first["train/steps"]
    assert resumed["train/loss_by_step"] == straight["train/loss_by_step"]


def test_a_folder_that_is_not_prepared_is_named_with_the_fix(tmp_path):
    from panda.data.shards import ShardFormatError, ShardSource

    with pytest.raises(ShardFormatError, match=r"panda\.data\.prepare .*--output"):
        ShardSource.open("valley", str(tmp_path / "nothing_here"))


def test_a_short_clip_is_kept_and_padded_as_the_release_pads(zoo, tmp_path):
    """A clip with fewer frames than --frames: kept by default and padded at training time with
    all-zero frames whose mask is zero (docs/model-reference.md, "Frame sampling"); --min-frames
    still filters when asked."""
    from panda.data.datasets import FramePipeline
    from panda.data.frames import preprocess_frames
    from panda.data.video import decode_video

    root, _ = zoo
    short = os.path.join(root, "videos", "short.mp4")
    decoded = decode_video(short, 4)
    assert decoded.num_frames == 2 and len(decoded.frames) == 2
    sample = FramePipeline(4, 56, 7)(short)
    pixels, mask = preprocess_frames(decoded.frames, 4, 56, 7)
    assert torch.equal(sample["pixels"], pixels) and torch.equal(sample["frame_mask"], mask)
    assert torch.count_nonzero(sample["pixels"][2:]) == 0 and mask[2:].sum() == 0 and mask[:2].sum() > 0
    stats = prepare(zoo_options(root, str(tmp_path / "strict"), min_frames=4))
    rejects = [json.loads(line) for line in open(tmp_path / "strict" / "rejects.jsonl")]
    assert any(r["id"] == "short" and r["code"] == "too_few_frames" and "--min-frames" in r["reason"] for r in rejects)
    assert stats["rejected_by_reason"]["too_few_frames"] == 1


# --- mixtures: shard folders and records files, weights, caps, per-source frames ---------------

def _golden_specs(n_a=301, n_b=97, weights=(None, None), caps=(None, None)):
    """Two made-up sources shaped like Valley and Video-ChatGPT (chunks of ~7 samples, token lengths)."""
    import numpy as np

    from panda.data.sampling import SourceSpec

    rng = np.random.default_rng(2024)
    specs = []
    for name, n, w, cap in (("valley", n_a, weights[0], caps[0]), ("videochatgpt", n_b, weights[1], caps[1])):
        chunks = np.sort(rng.integers(0, max(1, n // 7), n)).tolist()
        lengths = rng.integers(20, 900, n).tolist()
        specs.append(SourceSpec(name, n, chunks, lengths, w, cap))
    return specs


def _plans(specs, epochs=3, **kw):
    """Every rank's batches of ``epochs`` epochs, one rank and two."""
    from panda.data.sampling import EpochBatchSampler

    return [[EpochBatchSampler(specs, rank=rank, world=world, **kw).rank_batches(e) for e in range(epochs)]
            for world in (1, 2) for rank in range(world)]


def test_mixture_sampler_plans_are_todays_and_caps_clamp_each_source_per_epoch():
    import hashlib

    from panda.data.sampling import SourceSpec

    # the sampler's plans as the code before mixtures made them (recorded from it): recipe-shaped sources
    digest = {
        "stage1": (_golden_specs()[:1], dict(batch_size=8, seed=42, fraction=0.5, fraction_seed=42),
                   "576e61e86c8f1a7d675d62b60b9d781f1c4b000738b73993a8af26943b740757"),
        "stage2": (_golden_specs()[:1], dict(batch_size=8, seed=42),
                   "ea31da1e6bfbb9c5b83d27946ae68c2975a448204beef9df596b947542088b4b"),
        "two": (_golden_specs(), dict(batch_size=4, seed=42),
                "9d50582a01e56cb639797addbc0977daa8b620046b6103e757c3898d9218db99"),
        "two_weighted": (_golden_specs(weights=(0.7, 0.3)), dict(batch_size=4, seed=1, samples_per_epoch=500,
                                                                 shuffle_window=16, group_batches=4),
                         "b7360281d7c20f30719c586b0b2e37d618c6ba051577b7d7f0cdd25b62d1d5e9"),
        "records": ([SourceSpec("records", 50, list(range(50)), list(range(50)))],
                    dict(batch_size=4, seed=42, group_by_length=False),
                    "b6a790ed64ba9829e0253677e7338d2113f2a14d16e716d474eaa32fa18ea993"),
    }
    for name, (specs, kw, want) in digest.items():
        assert hashlib.sha256(json.dumps(_plans(specs, **kw)).encode()).hexdigest() == want, name

    # a cap: at most that many samples of the source per epoch, a fresh draw each epoch; the others keep theirs
    from panda.data.sampling import EpochBatchSampler

    weighted = EpochBatchSampler(_golden_specs(weights=(0.5, 0.5), caps=(None, 30)), 4, seed=0, samples_per_epoch=400)
    assert weighted.quotas == [200, 30]
    unweighted = EpochBatchSampler(_golden_specs(caps=(100, None)), 4, seed=0)
    assert unweighted.quotas == [100, 97]
    drawn = []
    for epoch in range(2):
        flat = [i for b in unweighted.epoch_batches(epoch) for i in b]
        drawn.append({i for i in flat if i < 301})
        assert len(flat) == 197 and len(drawn[-1]) == 100 and all(len({i < 301 for i in b}) == 1
                                                                   for b in unweighted.epoch_batches(epoch))
    assert drawn[0] != drawn[1]  # later epochs reach other samples of the capped source
    with pytest.raises(ValueError, match="cap must be >= 1"):
        EpochBatchSampler(_golden_specs(caps=(0, None)), 4)


def _todays_specs(cfg):
    """How the data module made its sampler's sources before mixtures (the code of that version):
    the reference the mixture path must reproduce."""
    from panda.build import frame_pipeline
    from panda.data.records import load_records
    from panda.data.sampling import SourceSpec
    from panda.data.shards import ShardSource

    pipeline = frame_pipeline(cfg)
    if cfg.data.shards:
        specs = []
        for s in cfg.data.shards:
            src = ShardSource.open(s.name, s.path, s.weight, cfg.data.cache_dir)
            full = src.llm_lengths(pipeline.sampling, pipeline.frames)
            specs.append(SourceSpec(src.name, src.num_records, src.record_chunks(), full or src.lengths, src.weight))
        return specs
    records, _ = load_records([os.path.join(cfg.data.root, p) for p in cfg.data.train_records])
    return [SourceSpec("records", len(records), list(range(len(records))),
                       [sum(len(q) + len(a) for q, a in r.turns) for r in records])]


def _datamodule_plans(cfg, tokenizer):
    from panda.build import build_datamodule

    dm = build_datamodule(cfg, tokenizer)
    dm.setup("fit")
    return [[dm.batch_sampler(rank, world).rank_batches(e) for e in range(2)] for world in (1, 2) for rank in range(world)], dm


def test_the_release_recipes_data_as_mixtures_batch_exactly_as_before(synthetic_shards, synthetic_root, tokenizer, tmp_path):
    """data.shards (the release recipes' data=valley / videochatgpt / valley+videochatgpt) and
    data.train_records are mixtures of one or two sources now: the same batches as the code before
    (its construction of the sampler's sources, above) and as the same sources listed in data.sources."""
    from panda.config import to_train_config

    root = tmp_path / "mix"
    root.mkdir()
    os.symlink(synthetic_shards, root / "valley")
    os.symlink(synthetic_shards, root / "videochatgpt")
    recipe = ["init.path=/m/EVE", "teacher.path=/m/LanguageBind", "trainer.devices=1"]
    one = f"data.sources=[{{name: valley, path: '{synthetic_shards}'}}]"
    two = (f"data.sources=[{{name: valley, path: valley, weight: 0.7}}, "
           f"{{name: videochatgpt, path: videochatgpt, weight: 0.3}}]")
    cases = [  # (today's keys, the same as data.sources)
        (["experiment=videopanda_7b/stage1_prealign", f"data.root={synthetic_shards}", *recipe],
         ["data.shards=[]", one]),
        (["experiment=videopanda_7b/stage2_pretrain", f"data.root={synthetic_shards}", *recipe], ["data.shards=[]", one]),
        (["experiment=videopanda_7b/stage3_finetune", f"data.root={synthetic_shards}", *recipe],
         ["data.shards=[]", one.replace("valley", "videochatgpt")]),
        (["data=valley+videochatgpt", f"data.root={root}", "data.shards.0.weight=0.7", "data.shards.1.weight=0.3",
          "data.samples_per_epoch=150", "data.shuffle_window=8", "data.group_batches=2", "stab=release", "frames=8"],
         ["data.shards=[]", two]),
        (tiny_overrides(synthetic_root) + ["data.group_by_length=true"],
         ["data.train_records=[]", "data.sources=[{name: records, path: train/train_json/synthetic_train.json}]"]),
    ]
    from panda.data.sampling import EpochBatchSampler

    for today, as_mixture in cases:
        cfg = to_train_config(compose(today))
        d = cfg.data
        reference = [[EpochBatchSampler(_todays_specs(cfg), d.batch_size, seed=cfg.seed, rank=rank, world=world,
                                        samples_per_epoch=d.samples_per_epoch, shuffle_window=d.shuffle_window,
                                        group_by_length=d.group_by_length, group_batches=d.group_batches,
                                        fraction=d.fraction, fraction_seed=d.fraction_seed).rank_batches(e)
                      for e in range(2)] for world in (1, 2) for rank in range(world)]
        plans, dm = _datamodule_plans(cfg, tokenizer)
        assert plans == reference, today[0]
        mixed = to_train_config(compose(today + as_mixture))
        assert mixed.data.sources and not mixed.data.shards
        assert _datamodule_plans(mixed, tokenizer)[0] == reference, today[0]
    assert cfg.data.fraction == 1 and to_train_config(compose(cases[0][0])).data.fraction == 0.5  # stage 1's half is in

    # per-source frame sampling: one batch setting per source, the run's where unset
    cfg = to_train_config(compose(tiny_overrides(synthetic_root) + [
        "data.train_records=[]",
        f"data.sources=[{{name: shards, path: '{synthetic_shards}'}}, "
        "{name: long, path: train/train_json/synthetic_train.json, video_root: train, frames: 8}, "
        "{name: fps, path: train/train_json/synthetic_train.json, video_root: train, sampling: fps, max_frames: 8}]"]))
    _, dm = _datamodule_plans(cfg, tokenizer)
    from panda.model_card import _data_source

    assert "a mixture of `shards`" in _data_source(cfg) and "`fps` (train/train_json/synthetic_train.json, sampling fps, " \
        "max_frames 8)" in _data_source(cfg)  # the model card names the sources
    ds = dm.train_set
    shards, long, fps = (ds.datasets[j].pipeline for j in range(3))
    assert (shards.frames, long.frames, fps.frames) == (4, 8, 4) and not shards.varies and not long.varies
    assert fps.varies and fps.sampling.max_frames == 8 and long.sampling.mode == "release"
    for j, frames in ((0, 4), (1, 8)):
        sample = ds[ds.starts[j]]
        assert sample["source"] == ("shards", "long")[j] and sample["pixels"].shape[0] == frames
        assert int((sample["input_ids"] == -200).sum()) == frames  # one placeholder per frame


def _mixture_run(synthetic_root, shards, run_dir, *extra, sources=None):
    from panda.training.run import train

    sources = sources or (f"data.sources=[{{name: shards, path: '{shards}', weight: 0.75}}, "
                          "{name: recs, path: train/train_json/synthetic_train.json, video_root: train, weight: 0.25, "
                          "frames: 8}]")
    return train(compose(tiny_overrides(synthetic_root, str(run_dir)) + [
        "data.train_records=[]", sources, "evaluate=false", "logger=csv", "trainer.log_every_n_steps=1", *extra]))


def _share_columns(run_dir) -> list[dict]:
    import csv

    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        return [{k: v for k, v in r.items() if k.startswith(("data/source_share/", "data/skipped/"))} | {"step": r["step"]}
                for r in csv.DictReader(f) if r.get("train/loss")]


def test_a_mixture_of_shards_and_records_resumes_mid_epoch_exactly(synthetic_shards, synthetic_root, tmp_path):
    """Two sources (prepared shards; a records file at 8 frames), weighted, a step limit inside the
    second epoch: stopped after 3 steps and resumed, the run trains the same batches to the same
    losses and weights, and its per-source counts and logged shares continue where they were."""
    common = ["trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=1000", "stage.schedule=constant",
              "stage.warmup_ratio=0", "data.num_workers=2", "data.shuffle_window=8", "data.samples_per_epoch=32"]
    straight = _mixture_run(synthetic_root, synthetic_shards, tmp_path / "straight", "trainer.max_steps=9", *common)
    _mixture_run(synthetic_root, synthetic_shards, tmp_path / "split", "trainer.max_steps=3", *common)
    resumed = _mixture_run(synthetic_root, synthetic_shards, tmp_path / "split", "trainer.max_steps=9", "resume=last", *common)
    assert [s for s, _ in resumed["train/loss_by_step"]] == list(range(1, 10))
    assert resumed["train/loss_by_step"] == straight["train/loss_by_step"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["epoch"] >= 1 and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    counts = {k: v for k, v in straight.items() if k.startswith(("data/source_", "data/skipped/"))}
    assert counts == {k: v for k, v in resumed.items() if k.startswith(("data/source_", "data/skipped/"))}
    # 8 batches an epoch: 24 + 8 samples, then the first batch of the next
    assert counts["data/source_samples/shards"] + counts["data/source_samples/recs"] == 9 * 4
    assert counts["data/source_samples/recs"] in (8, 12) and counts["data/source_share/recs"] in (round(8 / 36, 6), round(12 / 36, 6))
    assert _share_columns(tmp_path / "split") == _share_columns(tmp_path / "straight")


def test_a_mixture_logs_each_sources_share_skips_and_rejects(synthetic_root, tmp_path):
    """data/source_share/NAME (share of the samples read so far), data/skipped/NAME[/REASON] and the
    records each source lost before training (prepare's; a records file's malformed ones), with the
    values the epoch's plan gives."""
    from panda.build import build_datamodule, build_tokenizer
    from panda.config import to_train_config

    records = json.load(open(os.path.join(synthetic_root, "train", "train_json", "synthetic_train.json")))
    bad = records[:8] + [{"id": "no_video"}, records[1]]  # malformed_record, duplicate_id: prepare leaves them out
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    shards = str(tmp_path / "shards")
    prepare(PrepareOptions(records=[str(tmp_path / "bad.json")], video_root=os.path.join(synthetic_root, "train"),
                           output=shards, frames=4, progress=False, tokenizer=os.path.join(synthetic_root, "tokenizer")))
    mine = records[8:16] + [{"id": "broken"}]  # one malformed record, two videos that are not there
    for r in mine[:2]:
        r["video"] = "synthetic/not_there.mp4"
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    sources = (f"data.sources=[{{name: prepared, path: '{shards}'}}, "
               f"{{name: mine, path: '{tmp_path / 'mine.json'}', video_root: train}}]")
    summary = _mixture_run(synthetic_root, None, tmp_path / "run", "trainer.max_epochs=1", sources=sources)
    assert summary["data/source_samples/prepared"] == summary["data/source_samples/mine"] == 8  # each once: no weights
    assert summary["data/source_share/prepared"] == summary["data/source_share/mine"] == 0.5
    assert summary["data/skipped/mine"] == summary["data/skipped/mine/missing"] == 2 == summary["train/skipped_samples"]
    assert summary["data/skipped/prepared"] == 0 and "data/skipped/prepared/missing" not in summary
    assert summary["data/prepare_rejected_records/prepared"] == 2 == summary["data/prepare_rejected_records"]
    assert summary["data/rejected_records/mine"] == 1 == summary["data/rejected_records"]

    # the logged shares and skips, step by step, are the plan's running counts
    cfg = to_train_config(compose(tiny_overrides(synthetic_root) + ["data.train_records=[]", sources]))
    dm = build_datamodule(cfg, build_tokenizer(cfg))
    dm.setup("fit")
    missing = {dm.train_set.starts[1] + i for i in range(2)}  # the records source's first two: not there
    read, skipped, want = {"prepared": 0, "mine": 0}, 0, []
    for step, batch in enumerate(dm.batch_sampler().rank_batches(0)):
        name = "prepared" if batch[0] < dm.train_set.starts[1] else "mine"
        read[name] += len(batch)
        skipped += len(missing & set(batch))
        want.append({"data/source_share/prepared": read["prepared"] / sum(read.values()),
                     "data/source_share/mine": read["mine"] / sum(read.values()),
                     "data/skipped/prepared": 0.0, "data/skipped/mine": float(skipped), "step": step})
    logged = [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in _share_columns(tmp_path / "run")]
    assert logged == [pytest.approx(row, rel=1e-6) for row in want] and len(want) == 4  # logged as float32


def test_bad_mixture_configs_are_named_with_the_fix(synthetic_shards, synthetic_root, tmp_path, monkeypatch, capsys):
    from panda.config import to_train_config
    from panda.errors import ConfigError

    def config(sources, *extra):
        return compose(tiny_overrides(synthetic_root, str(tmp_path / "run")) + ["data.train_records=[]",
                                                                                  f"data.sources={sources}", *extra])

    records = "train/train_json/synthetic_train.json"
    for sources, extra, message in [
        (f"[{{name: a, path: '{synthetic_shards}', weight: 0}}]", [], r"data\.sources\.0\.weight=0\.0 \(a\): weights must be > 0"),
        (f"[{{name: a, path: '{synthetic_shards}', weight: 1}}, {{name: b, path: {records}}}]", [],
         r"data\.sources: give every source a weight or none"),
        (f"[{{name: a, path: '{synthetic_shards}'}}, {{name: a, path: {records}}}]", [], r"name='a': two sources share"),
        (f"[{{name: 'a/b', path: {records}}}]", [], r"letters, digits"),
        (f"[{{name: a, path: {records}, cap: 0}}]", [], r"data\.sources\.0\.cap=0 \(a\)"),
        (f"[{{name: a, path: {records}, frames: 6}}]", [], r"data\.sources\.0\.frames=6 \(a\) must be a positive multiple of stab\.chunk_size=4"),
        (f"[{{name: a, path: {records}, sampling: budget, max_visual_tokens: 10}}]", [],
         r"data\.sources\.0 \(a\): data\.sources\.0\.max_visual_tokens=10 does not hold one STAB chunk"),
        (f"[{{name: a, path: '{synthetic_shards}', video_root: train}}]", [], r"video_root is set but .* is not a records file"),
        (f"[{{name: a, path: {records}}}]", ["data.train_records=[x.json]"], r"set data\.train_records=\[\]"),
        (f"[{{name: a, path: {records}}}]", [f"data.shards=[{{name: s, path: '{synthetic_shards}'}}]"],
         r"data\.sources and data\.shards are both set"),
    ]:
        with pytest.raises(ValueError, match=message):
            to_train_config(config(sources, *extra))
    with pytest.raises(ValueError, match=r"names no training data: list the sources in data\.sources \(data=mixture\)"):
        to_train_config(compose(["data=mixture", "data.root=/data"]))

    from panda.training.run import train

    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "empty.json").write_text(json.dumps([{"id": "x"}]))  # its one record is malformed
    for sources, error, message in [
        ("[{name: a, path: nothere}]", ConfigError,
         rf"data\.sources\.0\.path={synthetic_root}/nothere \(a\) is neither a prepared shard folder nor a records file"),
        (f"[{{name: a, path: '{tmp_path / 'notes.txt'}'}}]", ConfigError, r"is neither .*\(a file\)"),
        ("[{name: a, path: missing.json}]", ConfigError, r"data\.sources\.0\.path=.*missing\.json: no such records file"),
        (f"[{{name: a, path: '{tmp_path / 'empty.json'}'}}]", ConfigError,
         r"data\.sources\.0: no usable training records in .*empty\.json .*\(1 malformed"),
        (f"[{{name: a, path: '{synthetic_root}'}}]", ConfigError,
         r"data\.sources\.0\.path=.* \(a\): .*holds raw data.*A records file is a source too"),
    ]:
        with pytest.raises(error, match=message):
            train(config(sources, "trainer.max_steps=1"))
    # `panda train`'s task: each of these ends the command with exit code 2 and its one-line message
    import logging

    from panda.train import task

    monkeypatch.setattr(logging, "shutdown", lambda: None)  # the command's exit closes its log; pytest's stays open
    for sources in ("[{name: a, path: nothere}]", f"[{{name: a, path: {records}, weight: -1}}]",
                    f"[{{name: a, path: '{tmp_path / 'empty.json'}'}}]"):
        with pytest.raises(SystemExit) as exit_:
            task(config(sources, "trainer.max_steps=1"))
        assert exit_.value.code == 2 and "data.sources.0" in capsys.readouterr().err
