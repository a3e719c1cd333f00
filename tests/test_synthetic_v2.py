"""The v2 synthetic benchmark asks what it claims to ask: no single frame tells the direction (a
probe on the object's position is near chance), two frames do, the dot and the lights are where
the answers say, and the files keep the real layout."""

import hashlib
import json
import os

import numpy as np
import pytest

from panda.data.synthetic import COLOURS, LIGHT_RGB, QUADRANTS, SyntheticConfig, _sample_clip, generate

FRAMES = 16


def _object_centre(frame, colour):
    near = np.abs(frame.astype(int) - np.array(COLOURS[colour])).sum(-1) < 40
    ys, xs = np.nonzero(near)
    return xs.mean(), ys.mean()


def _clips(n, seed=0):
    rng = np.random.default_rng(seed)
    pan = SyntheticConfig().camera_pan  # the default v2 clip: the camera follows the object
    return [_sample_clip(rng, 2, FRAMES, 1.0, pan) for _ in range(n)]


def _knn_accuracy(features, labels, k=25, train=0.75):
    """Held-out accuracy of a k-nearest-neighbour vote: a probe with no assumption about the shape
    of the decision boundary (a box edge, a corner)."""
    x, y = np.asarray(features, float), np.asarray(labels)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    n = int(len(x) * train)
    dist = ((x[n:, None] - x[None, :n]) ** 2).sum(-1)
    votes = y[:n][np.argsort(dist, 1)[:, :k]]
    pred = [max(set(v), key=list(v).count) for v in votes]
    return float(np.mean(np.array(pred) == y[n:]))


@pytest.fixture(scope="module")
def clips():
    return _clips(800)


def test_no_single_frame_tells_the_direction_but_two_frames_do(clips):
    labels = [a["direction"] for _, a in clips]

    def position(frames, answers, t):  # the object's place in frame t (the direction's only single-frame clue)
        x, y = _object_centre(frames[t], answers["colour"])
        h, w = frames.shape[1:3]
        return [x / w, y / h, w / h]

    single = {t: _knn_accuracy([position(f, a, t) for f, a in clips], labels) for t in (0, FRAMES // 2, FRAMES - 1)}
    # chance is 0.25; frame 0 is what a 1-frame run samples. The mid-clip position is independent of the
    # direction; the end frames leak a little (the box the object starts in is shifted by half its travel)
    assert all(acc <= 0.40 for acc in single.values()), single
    assert single[FRAMES // 2] <= 0.32, single

    def displacement(frames, answers):
        (x0, y0), (x1, y1) = (_object_centre(frames[t], answers["colour"]) for t in (0, FRAMES - 1))
        return [x1 - x0, y1 - y0]

    assert _knn_accuracy([displacement(f, a) for f, a in clips], labels) >= 0.97


def test_the_object_stays_inside_the_frame(clips):
    for frames, answers in clips[:200]:
        near = np.abs(frames.astype(int) - np.array(COLOURS[answers["colour"]])).sum(-1) < 40  # (T, H, W)
        assert near[:, :, 0].sum() == 0 and near[:, :, -1].sum() == 0  # no wrap-around: never touches an edge
        assert near[:, 0, :].sum() == 0 and near[:, -1, :].sum() == 0
        areas = near.sum((1, 2))
        assert areas.min() >= 0.9 * areas.max()  # the whole object is visible in every frame


def test_the_dot_and_the_lights_are_where_the_answers_say(clips):
    for frames, answers in clips[:100]:
        h, w = frames.shape[1:3]
        mid = frames[FRAMES // 2]
        cx, cy = _object_centre(mid, answers["colour"])
        near = np.abs(mid.astype(int) - np.array(COLOURS[answers["colour"]])).sum(-1) < 40
        oy, ox = np.nonzero(near)
        box = mid[oy.min() : oy.max() + 1, ox.min() : ox.max() + 1].astype(int).sum(-1)
        ys, xs = np.nonzero(box == 0)  # the black dot, inside the object's bounding box
        xs, ys = xs + ox.min(), ys + oy.min()
        qx, qy = QUADRANTS[answers["mark"]]
        assert np.sign(xs.mean() - cx) == qx and np.sign(ys.mean() - cy) == qy
        lit = (np.abs(frames.astype(int) - np.array(LIGHT_RGB)).sum(-1) < 10)  # (T, H, W)
        corner_of = {signs: name for name, signs in QUADRANTS.items()}
        order = []
        for t in range(FRAMES):
            ys, xs = np.nonzero(lit[t])
            if len(xs):
                corner = corner_of[(int(np.sign(xs.mean() - w / 2)), int(np.sign(ys.mean() - h / 2)))]
                if not order or order[-1] != corner:
                    order.append(corner)
        assert len(order) == 2 and order[0] == answers["order"] and order[1] != order[0]
        # one light per half: frames of the first half never show the second light
        assert not lit[FRAMES // 2].any()


def test_v2_files_keep_the_real_layout_and_v1_draws_what_it_always_drew(tmp_path):
    v2 = generate(SyntheticConfig(version=2, train_videos=6, eval_videos=3, kinds=["colour", "direction", "mark", "order"]),
                  str(tmp_path / "v2"))
    answers = json.load(open(os.path.join(v2, "eval/Synthetic_Zero_Shot_QA/test_a.json")))
    assert sorted({a["type"] for a in answers}) == ["appearance", "detail", "motion", "order"]
    records = json.load(open(os.path.join(v2, "train/train_json/synthetic_train.json")))
    said = {turn["value"] for r in records for turn in r["conversations"] if turn["from"] == "gpt"}
    assert said & set(QUADRANTS) and said & set(COLOURS)
    v1 = generate(SyntheticConfig(version=1, train_videos=5, eval_videos=2), str(tmp_path / "v1"))
    assert json.load(open(os.path.join(v1, "DONE")))["version"] == 1
    # v1 draws exactly the random stream of the generator that made the first study's data (its
    # records hashed before v2 existed), so that study reruns as it was
    with open(os.path.join(v1, "train/train_json/synthetic_train.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == "97580b9343722458c049ef789f89ad60854e815c7b9e20c8b3c231e788a112c3"
    with pytest.raises(ValueError, match="version 1 asks colour, shape, direction"):
        SyntheticConfig(version=1, kinds=["mark"]).validate()


def test_the_question_mix_asks_a_kind_of_a_fraction_of_training_videos(tmp_path):
    root = generate(SyntheticConfig(version=2, train_videos=80, eval_videos=4, num_frames=8,
                                    question_mix={"colour": 0.3}), str(tmp_path / "mix"))
    records = json.load(open(os.path.join(root, "train/train_json/synthetic_train.json")))
    asked: dict[str, set] = {}
    for r in records:
        for turn in r["conversations"][1::2]:
            kind = "colour" if turn["value"] in COLOURS else "direction"
            asked.setdefault(kind, set()).add(r["video"])
    assert len(asked["direction"]) == 80  # every training video is asked the kinds the mix leaves out
    assert 10 <= len(asked["colour"]) <= 40  # ~30% of 80 (24 ± 4.1): 3.4 standard deviations either side
    answers = json.load(open(os.path.join(root, "eval/Synthetic_Zero_Shot_QA/test_a.json")))
    assert sorted(a["type"] for a in answers) == ["appearance"] * 4 + ["motion"] * 4  # held out: every kind
    for bad in ({"color": 0.5}, {"colour": 0.0}, {"colour": 1.5}, {"mark": 0.5, "version": 1}):
        version = bad.pop("version", 2)
        with pytest.raises(ValueError, match="question_mix"):
            SyntheticConfig(version=version, kinds=["colour"], question_mix=bad).validate()
    # a mix that thins no asked kind draws nothing: the records are those of no mix (the v2 study's data)
    plain, thinned = (generate(SyntheticConfig(version=2, train_videos=6, eval_videos=2, num_frames=8, kinds=["direction"],
                                               question_mix=mix), str(tmp_path / name))
                      for name, mix in (("plain", {}), ("thinned", {"colour": 0.3})))
    read = lambda root: open(os.path.join(root, "train/train_json/synthetic_train.json")).read()  # noqa: E731
    assert read(plain) == read(thinned)
    # and those spellings of no thinning are one dataset: the cached root is found made, not made again
    done = os.path.join(plain, "DONE")
    made = os.stat(done).st_mtime_ns
    for mix in ({"colour": 0.3}, {"direction": 1.0}):
        generate(SyntheticConfig(version=2, train_videos=6, eval_videos=2, num_frames=8, kinds=["direction"],
                                 question_mix=mix), plain)
    assert os.stat(done).st_mtime_ns == made
