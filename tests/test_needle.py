"""The needle (synthetic v3): in the decoded mp4 frames the flash appears exactly once, for 2-4
frames, in the half and the colour the answers say; generation is seeded; the tokenizer knows
every question and answer."""

import json
import os

import numpy as np
import pytest

from panda.data.synthetic import ANSWERS, COLOURS, HALVES, QUESTIONS, SyntheticConfig, _stamp, generate
from panda.data.tokenizer import load_tokenizer
from panda.data.video import decode_video

FRAMES = 64


def _config(**kw) -> SyntheticConfig:
    return SyntheticConfig(**{"version": 3, "kinds": ["flash_colour", "flash_half"], "num_frames": FRAMES, "fps": 1,
                              "needle_side": 56, "train_videos": 4, "eval_videos": 8, **kw})


def _all_frames(path: str) -> np.ndarray:
    """Every frame of the file, through panda's decoder (a picker that asks for all of them)."""
    return decode_video(path, FRAMES, picker=lambda n, fps, size: list(range(n))).frames


def _lit(frames: np.ndarray, colour: str) -> np.ndarray:
    """(T,) pixels per frame within a small distance of ``colour`` (H.264 moves colours a few levels)."""
    return (np.abs(frames.astype(int) - np.array(COLOURS[colour])).sum(-1) < 60).sum((1, 2))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("needle")
    return [generate(_config(), str(base / name)) for name in ("a", "b")]


def _eval_split(root):
    qa = os.path.join(root, "eval", "Synthetic_Zero_Shot_QA")
    questions, answers = (json.load(open(os.path.join(qa, name))) for name in ("test_q.json", "test_a.json"))
    return qa, questions, answers


def test_the_flash_shows_once_in_the_half_and_colour_the_answers_say(roots):
    qa, questions, answers = _eval_split(roots[0])
    by_video: dict[str, dict[str, str]] = {}
    for q, a in zip(questions, answers):
        by_video.setdefault(q["video_name"], {})[a["type"]] = a["answer"]
    assert len(by_video) == 8 and all(set(v) == {"flash_colour", "flash_half"} for v in by_video.values())
    assert {v["flash_half"] for v in by_video.values()} <= set(HALVES)
    square = (0.6 * 56 - 1) ** 2  # the smallest square's area
    for name, truth in by_video.items():
        frames = _all_frames(os.path.join(qa, "videos", name + ".mp4"))
        assert frames.shape == (FRAMES, 56, 56, 3)
        lit = _lit(frames, truth["flash_colour"]) > 0.6 * square
        on = np.flatnonzero(lit)
        assert 2 <= len(on) <= 4 and np.all(np.diff(on) == 1), (name, on)  # one run of 2-4 frames: exactly once
        half = "first half" if on[-1] < FRAMES // 2 else "second half"
        assert (on[0] < FRAMES // 2) == (on[-1] < FRAMES // 2) and half == truth["flash_half"], (name, on)
        # no other palette colour anywhere, and outside the flash the background is all there is
        for other in set(COLOURS) - {truth["flash_colour"]}:
            assert _lit(frames, other).max() < 0.2 * square, (name, other)
        off = np.delete(frames, on, axis=0).astype(int)
        assert off.max() < 130 and np.abs(np.diff(off, axis=0)).mean() < 2  # dark, and all but still


def test_generation_is_seeded(roots, tmp_path):
    a, b = roots
    for rel in ("train/train_json/synthetic_train.json", "eval/Synthetic_Zero_Shot_QA/test_q.json",
                "eval/Synthetic_Zero_Shot_QA/test_a.json"):
        assert open(os.path.join(a, rel)).read() == open(os.path.join(b, rel)).read()
    video = "eval/Synthetic_Zero_Shot_QA/videos/eval_00003.mp4"
    assert np.array_equal(_all_frames(os.path.join(a, video)), _all_frames(os.path.join(b, video)))
    other = generate(_config(seed=1, train_videos=1, eval_videos=2), str(tmp_path / "seed1"))
    assert _eval_split(other)[2] != _eval_split(a)[2][:4]
    records = json.load(open(os.path.join(a, "train/train_json/synthetic_train.json")))
    said = {turn["value"] for r in records for turn in r["conversations"] if turn["from"] == "gpt"}
    assert said <= set(ANSWERS["flash_colour"][:4]) | set(HALVES)


def test_the_tokenizer_knows_every_question_and_answer(roots):
    tok = load_tokenizer(os.path.join(roots[0], "tokenizer"))
    texts = QUESTIONS["flash_colour"] + QUESTIONS["flash_half"] + list(COLOURS)[:4] + list(HALVES)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids).strip() == text, text


def test_settings_are_checked_and_earlier_roots_stay_made():
    for bad, match in (({"needle_event": [3, 2]}, "needle_event"), ({"needle_event": [2, 40]}, "needle_event"),
                       ({"needle_colours": 9}, "needle_colours"), ({"needle_scale": [0.5, 1.5]}, "needle_scale"),
                       ({"kinds": ["colour"]}, "version 3 asks")):
        with pytest.raises(ValueError, match=match):
            _config(**bad).validate()
    # v3's settings are not in a v1 / v2 root's stamp: roots made before v3 existed are found made
    v2 = _stamp(SyntheticConfig(version=2, needle_side=64), {})
    assert not {"needle_side", "needle_event", "needle_colours"} & set(v2)
