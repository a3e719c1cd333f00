"""Regenerate ``release_ids.json``: the ids and labels the released Video-Panda code makes, recorded
with the tokenizer it used (transformers 4.31's slow ``LlamaTokenizer``, ``legacy: false``).

Not run by the tests (they read the JSON). To regenerate, in a scratch environment:

    python3 -m venv /tmp/tf431 && /tmp/tf431/bin/pip install "transformers==4.31.0" sentencepiece protobuf
    /tmp/tf431/bin/python tests/golden/make_release_ids.py

It trains a small LLaMA-style SentencePiece model (BPE, byte fallback, split digits, dummy
prefix) into ``release_tokenizer/``, then applies the release's data rules, written out here
step by step from its training and evaluation code (docs/recipe-reference.md, "From a record to tokens"):

1. a human message that ends with ``<video>`` has ``"\\n<video>"`` removed, is stripped and gets
   ``"<video>\\n"`` in front; any other placement is left alone; ``<video>`` -> ``<image>`` x frames;
2. the Vicuna v1 prompt: system + " ", then ``USER: <q> ASSISTANT: <a></s>`` per turn;
3. ids: the prompt split at ``<image>``, each chunk ``tokenizer(chunk).input_ids``, BOS kept on
   the first chunk only, -200 between chunks;
4. labels: rounds split at ``</s>``; cur_len = 1; per round, mask ``instruction_len`` =
   len(ids of round text through "ASSISTANT: ") - 2 tokens, advance by len(ids of round); mask the
   rest; if cur_len (< max length) differs from the count of non-pad ids, mask everything;
5. the collator cuts ids and labels at the max length.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "release_tokenizer")
IMAGE = "<image>"
PLACEHOLDER = -200
IGNORE = -100
SYSTEM = ("A chat between a curious {who} and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the {who}'s questions.")


def corpus() -> list[str]:
    rng = random.Random(0)
    words = ("the a man woman dog cat red blue green moving object left right up down slicing bread video shows "
             "what is doing colour which way does go describe it happening scene person walks runs jumps table "
             "kitchen outdoor indoor ball car street fast slow first then finally watch tell me happens").split()
    lines = []
    for _ in range(3000):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        lines.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ","]))
    lines += [SYSTEM.format(who=w) + " USER: hello ASSISTANT: hi" for w in ("user", "human")] * 40
    lines += ["SUPERUSER and POWERUSER are names"] * 30  # "USER" without the word-start mark becomes a piece
    lines += ["There are 3 people and 12 cars in 2024, 7.5 km/h; café naïve résumé été (a) ... — “quoted”"] * 20
    return lines


def train_tokenizer() -> None:
    import sentencepiece as spm

    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    text = os.path.join(TOKENIZER_DIR, "corpus.txt")
    with open(text, "w") as f:
        f.write("\n".join(corpus()))
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=os.path.join(TOKENIZER_DIR, "tokenizer"), vocab_size=700, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    os.remove(text)
    os.remove(os.path.join(TOKENIZER_DIR, "tokenizer.vocab"))

    def special(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": special("<s>"), "eos_token": special("</s>"),
              "unk_token": special("<unk>"), "clean_up_tokenization_spaces": False, "legacy": False,
              "model_max_length": 4096, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer"}  # the keys Vicuna-7B v1.5 ships
    with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(TOKENIZER_DIR, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": special("<s>"), "eos_token": special("</s>"), "unk_token": special("<unk>")}, f, indent=2)


def place_video(message: str) -> str:
    if message.endswith("<video>"):
        message = message.replace("\n<video>", "").strip()
        message = ("<video>\n" + message).strip()
    return message


def chunk_ids(tok, prompt: str) -> list[int]:
    out = []
    for k, chunk in enumerate(prompt.split(IMAGE)):
        ids = tok(chunk).input_ids
        assert ids[0] == tok.bos_token_id
        out += ([PLACEHOLDER] if k else []) + (ids if k == 0 else ids[1:])
    return out


def release_sample(tok, conversation: list[dict], frames: int, max_length: int) -> dict:
    messages = []
    for k, turn in enumerate(conversation):
        value = turn["value"]
        if "<video>" in value:
            value = place_video(value)
        messages.append(value.replace("<video>", IMAGE * frames))
    prompt = SYSTEM.format(who="user") + " "
    for k, value in enumerate(messages):
        prompt += ("USER: " + value + " ") if k % 2 == 0 else ("ASSISTANT: " + value + "</s>")
    ids = chunk_ids(tok, prompt)
    labels = list(ids)
    cur = 1
    labels[:cur] = [IGNORE] * cur
    for rnd in prompt.split("</s>"):
        if rnd == "":
            break
        parts = rnd.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        instruction = len(chunk_ids(tok, parts[0] + " ASSISTANT: ")) - 2
        labels[cur:cur + instruction] = [IGNORE] * len(labels[cur:cur + instruction])
        cur += len(chunk_ids(tok, rnd))
    labels[cur:] = [IGNORE] * len(labels[cur:])
    non_pad = sum(1 for t in ids if t != tok.pad_token_id)
    mismatch = cur < max_length and cur != non_pad
    if mismatch:
        labels = [IGNORE] * len(ids)
    return {"prompt": prompt, "input_ids": ids[:max_length], "labels": labels[:max_length], "mismatch": mismatch}


def eval_prompt(tok, question: str, frames: int) -> dict:
    prompt = SYSTEM.format(who="human") + " USER: " + IMAGE * frames + "\n" + question + " ASSISTANT:"
    return {"prompt": prompt, "input_ids": chunk_ids(tok, prompt)}


def h(text):
    return {"from": "human", "value": text}


def g(text):
    return {"from": "gpt", "value": text}


CASES = [
    ("video_last_with_newline", [h("What is the man doing?\n<video>"), g("He is slicing bread.")], 8, 4096),
    ("video_first", [h("<video>\nDescribe the video."), g("A dog runs left, then a cat jumps.")], 8, 4096),
    ("video_mid_text", [h("Watch <video> and tell me what happens."), g("The red ball goes up.")], 4, 4096),
    ("three_rounds", [h("<video>\nWhat colour is the moving object?"), g("It is red."),
                      h("Which way does it go?"), g("It goes left."), h("Is it fast?"), g("Yes, fast.")], 8, 4096),
    ("answer_starts_with_digit", [h("How many cars?\n<video>"), g("3 cars and 12 people.")], 8, 4096),
    ("answer_starts_with_punctuation", [h("<video>\nWhich one?"), g("(a) the blue one ... maybe.")], 4, 4096),
    ("answer_starts_with_accent", [h("<video>\nWhen?"), g("été, in the kitchen.")], 4, 4096),
    ("answer_starts_with_emoji", [h("<video>\nHow does it feel?"), g("😀 happy!")], 4, 4096),
    ("later_round_starts_with_digit", [h("<video>\nWhat is it?"), g("A car."), h("How many?"), g("2024 cars.")], 4, 4096),
    ("newlines_and_double_spaces", [h("<video>\nDescribe  the scene.\nBe brief."), g("A man\nwalks  fast.")], 4, 4096),
    ("truncated_mid_answer", [h("<video>\nDescribe the video."), g("A man walks, then a dog runs. " * 6),
                              h("And then?"), g("The car goes left.")], 8, 90),
    ("answer_holds_assistant_marker", [h("<video>\nQuote it."), g("He said ASSISTANT: hello.")], 4, 4096),
]
EVAL_QUESTIONS = [("what is the man doing?", 8), ("Which way does the red ball go?", 4), ("How many cars are there?", 8)]


def main() -> None:
    from transformers import AutoTokenizer

    train_tokenizer()
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, use_fast=False, model_max_length=4096, padding_side="right")
    assert type(tok).__name__ == "LlamaTokenizer" and tok.legacy is False
    tok.pad_token = tok.unk_token  # the release's vicuna_v1 setting
    out = {"transformers": __import__("transformers").__version__, "cases": [], "eval_prompts": []}
    for name, conversation, frames, max_length in CASES:
        sample = release_sample(tok, conversation, frames, max_length)
        out["cases"].append({"name": name, "conversations": conversation, "frames": frames, "max_length": max_length,
                             **sample})
    for question, frames in EVAL_QUESTIONS:
        out["eval_prompts"].append({"question": question, "frames": frames, **eval_prompt(tok, question, frames)})
    with open(os.path.join(HERE, "release_ids.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    for case in out["cases"]:
        print(f"{case['name']:32s} {len(case['input_ids']):4d} ids, "
              f"{sum(1 for x in case['labels'] if x != IGNORE):3d} supervised, mismatch={case['mismatch']}")


if __name__ == "__main__":
    main()
