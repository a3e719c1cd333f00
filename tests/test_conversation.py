import pytest

from panda.data.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER_ID,
    get_template,
    tokenize_chat_prompt,
    tokenize_conversation,
    tokenize_prompt,
)
from panda.data.records import load_records, normalize_conversation
from panda.errors import RecordError, SampleError

GOLDEN_ONE_TURN = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image><image><image><image><image><image>"
    "<image><image>\nWhat is the man doing? ASSISTANT: He is slicing bread.</s>"
)


def test_vicuna_template_renders_the_release_text():
    turns = normalize_conversation([{"from": "human", "value": "What is the man doing?\n<video>"}, {"from": "gpt", "value": "He is slicing bread."}])
    text, spans = get_template("vicuna_v1").render([(q.replace("<video>", "<image>" * 8), a) for q, a in turns])
    assert text == GOLDEN_ONE_TURN
    assert [text[s:e] for s, e in spans] == ["He is slicing bread.</s>"]


def test_labels_cover_only_answers_and_their_eos(tokenizer):
    turns = [("<video>\nWhat colour is the moving object?", "red"), ("Which way does the object go?", "left")]
    out = tokenize_conversation(tokenizer, get_template("vicuna_v1"), turns, frames=4, max_length=4096)
    ids, labels = out.input_ids.tolist(), out.labels.tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(IMAGE_PLACEHOLDER_ID) == 4
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) .replace(" ", "") == "red</s>left</s>"
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == IMAGE_PLACEHOLDER_ID)
    # everything up to and including the first "ASSISTANT:" is unsupervised
    prompt = tokenize_prompt(tokenizer, get_template("vicuna_v1"), "What colour is the moving object?", 4).tolist()
    assert ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])


@pytest.mark.parametrize("tokenization", ["release", "spans"])
def test_a_follow_up_question_is_prompted_as_the_training_conversation_goes_on(tokenizer, tokenization):
    """The next question of a chat (panda demo) is the training text of the conversation so far,
    cut where its answer starts: the model is asked as it was taught."""
    template = get_template("vicuna_v1", tokenization)
    turns = [("<video>\nWhat colour is the moving object?", "red"), ("Which way does the object go?", "left")]
    trained = tokenize_conversation(tokenizer, template, turns, frames=4, max_length=4096)
    ids, labels = trained.input_ids.tolist(), trained.labels.tolist()
    prompt = tokenize_chat_prompt(tokenizer, template, [("What colour is the moving object?", "red")],
                                  "Which way does the object go?", 4).tolist()
    assert ids[:len(prompt)] == prompt and prompt.count(IMAGE_PLACEHOLDER_ID) == 4
    assert tokenizer.decode([t for t in labels[len(prompt):] if t != IGNORE_INDEX]).replace(" ", "") == "left</s>"
    # no history: the one-question prompt; a <video> in a later question stays text
    assert tokenize_chat_prompt(tokenizer, template, [], "What colour?", 4).tolist() == \
        tokenize_prompt(tokenizer, template, "What colour?", 4).tolist()
    later = tokenize_chat_prompt(tokenizer, template, [("What colour?", "red")], "<video> again?", 4).tolist()
    assert later.count(IMAGE_PLACEHOLDER_ID) == 4


def test_generation_prompt_ends_with_assistant_colon():
    text, spans = get_template("vicuna_v1_eval").render([("<image>\nWhat?", None)])
    assert text.endswith("USER: <image>\nWhat? ASSISTANT:") and "curious human" in text and spans == []


def test_video_token_moves_to_front_and_leading_assistant_turn_is_dropped():
    turns = normalize_conversation([
        {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Describe it. <video>"},
        {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "unanswered"},
    ])
    assert turns == [("<video>\nDescribe it.", "A dog.")]


@pytest.mark.parametrize("conv, reason", [
    ([], "non-empty list"),
    ([{"from": "human", "value": "<video>\nq"}, {"from": "human", "value": "again"}, {"from": "gpt", "value": "a"}], "alternate"),
    ([{"from": "human", "value": "<video>\nq <video>"}, {"from": "gpt", "value": "a"}], "once"),
    ([{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}], "unknown role"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "must be a string"),
])
def test_malformed_conversations_name_the_problem(conv, reason):
    with pytest.raises(RecordError, match=reason):
        normalize_conversation(conv, "file.json", 7)


def test_over_long_conversation_drops_trailing_turns_then_fails(tokenizer):
    """model.tokenization=spans: whole trailing turns go, visual tokens count."""
    turns = [("<video>\nWhat colour is the moving object?", "red")] + [("Which way does the object go?", "left")] * 5
    tpl = get_template("vicuna_v1", "spans")
    full = tokenize_conversation(tokenizer, tpl, turns, 4, 4096)
    one = tokenize_conversation(tokenizer, tpl, turns[:1], 4, 4096)
    cut = tokenize_conversation(tokenizer, tpl, turns, 4, len(one.input_ids) + 1)
    assert full.dropped_turns == 0 and cut.dropped_turns == 5
    assert cut.input_ids.tolist() == one.input_ids.tolist()
    with pytest.raises(SampleError, match="too long"):
        tokenize_conversation(tokenizer, tpl, turns, 4, 4096, visual_tokens_per_frame=2000, record_id="r1")


def test_release_rule_cuts_at_max_length_counting_each_frame_once(tokenizer):
    turns = [("<video>\nWhat colour is the moving object?", "red")] + [("Which way does the object go?", "left")] * 5
    tpl = get_template("vicuna_v1")
    full = tokenize_conversation(tokenizer, tpl, turns, 4, 4096, visual_tokens_per_frame=2000)
    cut = tokenize_conversation(tokenizer, tpl, turns, 4, len(full.input_ids) - 3, visual_tokens_per_frame=2000)
    assert full.cut_tokens == 0 and cut.cut_tokens == 3 and cut.dropped_turns == 0
    assert cut.input_ids.tolist() == full.input_ids.tolist()[:-3] and cut.labels.tolist() == full.labels.tolist()[:-3]


def test_video_token_stays_where_it_is_unless_it_ends_the_message():
    def first(value):
        return normalize_conversation([{"from": "human", "value": value}, {"from": "gpt", "value": "a"}])[0][0]

    assert first("Watch <video> and say what happens.") == "Watch <video> and say what happens."
    assert first("<video>\nDescribe.") == "<video>\nDescribe."
    assert first("Describe.\n<video>") == "<video>\nDescribe."
    assert first("  Describe.  ") == "<video>\nDescribe."  # no <video>: panda puts it in front


def test_load_records_skips_and_reports_malformed(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[{"id": "a", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\\nq"}, {"from": "gpt", "value": "x"}]},'
                    ' {"id": "b", "image": "b.jpg", "conversations": []}, 5,'
                    ' {"id": "a", "video": "c.mp4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "y"}]}]')
    records, rejects = load_records(path)
    assert [r.id for r in records] == ["a"]
    assert [r["index"] for r in rejects] == [1, 2, 3]
    assert "duplicate id" in rejects[2]["reason"] and "image record" in rejects[0]["reason"]
    with pytest.raises(RecordError, match=r"r\.json, record 1"):
        load_records(path, on_error="raise")
