"""Ids and labels exactly as the released model saw them (docs/recipe-reference.md, "Token ids").

``golden/release_ids.json`` was recorded by ``golden/make_release_ids.py`` with transformers
4.31's slow ``LlamaTokenizer`` (``legacy: false``, as Vicuna v1.5 ships it) on a LLaMA-style
SentencePiece model trained locally (``golden/release_tokenizer``). panda, under transformers 5,
must give the same ids and labels, id for id and label for label.
"""

import json
import os
import shutil

import pytest

from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from panda.data.conversation import get_template, tokenize_conversation, tokenize_prompt
from panda.data.records import normalize_conversation
from panda.data.tokenizer import load_tokenizer, save_tokenizer
from panda.errors import SampleError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
with open(os.path.join(GOLDEN, "release_ids.json"), encoding="utf-8") as _f:
    RECORDED = json.load(_f)
CASES = {c["name"]: c for c in RECORDED["cases"]}


@pytest.fixture(scope="module")
def release_tokenizer():
    return load_tokenizer(os.path.join(GOLDEN, "release_tokenizer"))


def panda_sample(tokenizer, case, tokenization="release"):
    turns = normalize_conversation(case["conversations"], "golden", 0)
    return tokenize_conversation(tokenizer, get_template("vicuna_v1", tokenization), turns, case["frames"],
                                 case["max_length"], record_id=case["name"])


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c["mismatch"]])
def test_ids_and_labels_match_the_release_id_for_id(release_tokenizer, name):
    case = CASES[name]
    got = panda_sample(release_tokenizer, case)
    assert got.input_ids.tolist() == case["input_ids"]
    assert got.labels.tolist() == case["labels"]


def test_the_recording_covers_the_quirks_that_matter(release_tokenizer):
    """The cases exercise what differs from a one-pass tokenisation (so the test above has teeth)."""
    assert RECORDED["transformers"] == "4.31.0"
    piece = release_tokenizer.convert_ids_to_tokens
    digit = CASES["answer_starts_with_digit"]
    first_label = next(i for i, x in enumerate(digit["labels"]) if x != IGNORE_INDEX)
    assert piece(digit["labels"][first_label]) == "\u2581"  # a lone "▁" before "3" is supervised
    frames_end = max(i for i, t in enumerate(digit["input_ids"]) if t == IMAGE_PLACEHOLDER_ID)
    assert piece(digit["input_ids"][frames_end + 1:frames_end + 3]) == ["\u2581", "<0x0A>"]  # after the frames
    rounds = CASES["three_rounds"]["input_ids"]
    assert [piece(rounds[i + 1]) for i, t in enumerate(rounds[:-1]) if t == 2] == ["USER", "USER"]  # no "▁" after </s>
    cut = CASES["truncated_mid_answer"]
    assert len(cut["input_ids"]) == cut["max_length"] and cut["labels"][-1] != IGNORE_INDEX  # cut answer stays supervised
    assert CASES["video_mid_text"]["prompt"].count("Watch <image>") == 1  # <video> left where it was


def test_panda_differs_from_a_one_pass_tokenisation(release_tokenizer):
    """The fast tokenizer over the whole text (what panda did before) gives other ids: the golden
    comparison distinguishes the two."""
    case = CASES["three_rounds"]
    text = case["prompt"].replace("<image>", "")
    one_pass = [release_tokenizer.bos_token_id] + release_tokenizer(text, add_special_tokens=False)["input_ids"]
    release_text = [t for t in case["input_ids"] if t != IMAGE_PLACEHOLDER_ID]
    assert one_pass != release_text


def test_a_tokenization_mismatch_is_counted_not_trained(release_tokenizer):
    case = CASES["answer_holds_assistant_marker"]  # the release masks every label of this sample
    assert all(x == IGNORE_INDEX for x in case["labels"])
    with pytest.raises(SampleError, match="tokenization mismatch"):
        panda_sample(release_tokenizer, case)


@pytest.mark.parametrize("k", range(len(RECORDED["eval_prompts"])))
def test_evaluation_prompts_match_the_release(release_tokenizer, k):
    prompt = RECORDED["eval_prompts"][k]
    got = tokenize_prompt(release_tokenizer, get_template("vicuna_v1_eval"), prompt["question"], prompt["frames"])
    assert got.tolist() == prompt["input_ids"]


def test_the_tokenizer_keeps_its_vocabulary_and_survives_a_save(release_tokenizer, tmp_path):
    """No <image> entry is added (a Vicuna folder keeps 32,000 rows), and a saved copy (the run's
    tokenizer, the export) still has tokenizer.model and the legacy key, so it tokenises the same."""
    assert len(release_tokenizer) == 700
    saved = save_tokenizer(release_tokenizer, str(tmp_path / "copy"))
    assert json.load(open(os.path.join(saved, "tokenizer_config.json")))["legacy"] is False
    assert os.path.isfile(os.path.join(saved, "tokenizer.model"))
    again = load_tokenizer(saved)
    case = CASES["three_rounds"]
    assert panda_sample(again, case).input_ids.tolist() == case["input_ids"]


def test_spans_rule_stays_available_and_drops_turns(release_tokenizer):
    case = dict(CASES["truncated_mid_answer"], max_length=4096)
    full = panda_sample(release_tokenizer, case, "spans")
    cut = panda_sample(release_tokenizer, dict(case, max_length=len(full.input_ids) - 1), "spans")
    assert full.dropped_turns == 0 and cut.dropped_turns == 1


def test_cutting_into_the_frames_is_an_error_naming_the_cut(release_tokenizer):
    case = dict(CASES["video_first"], max_length=40)
    with pytest.raises(SampleError, match="cut at max_length=40"):
        panda_sample(release_tokenizer, case)


def test_a_folder_without_the_legacy_key_tokenises_like_4_31_legacy(tmp_path):
    """4.31 defaults to legacy=True when tokenizer_config.json has no ``legacy``: the text after
    ``</s>`` keeps its dummy prefix ("▁USER" instead of "USER")."""
    folder = tmp_path / "legacy"
    shutil.copytree(os.path.join(GOLDEN, "release_tokenizer"), folder)
    config = json.load(open(folder / "tokenizer_config.json"))
    del config["legacy"]
    json.dump(config, open(folder / "tokenizer_config.json", "w"))
    tok = load_tokenizer(str(folder))
    case = CASES["three_rounds"]
    ids = panda_sample(tok, case).input_ids.tolist()
    user_after_eos = [ids[i + 1] for i, t in enumerate(ids[:-1]) if t == tok.eos_token_id]
    assert set(tok.convert_ids_to_tokens(user_after_eos)) == {"\u2581USER"}
    assert ids != case["input_ids"]
