"""Annotation records in the Valley / Video-ChatGPT format (docs/recipe-reference.md, "Record format") and QA
test files.

A record is ``{"id", "video", "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.
:func:`normalize_conversation` applies the release's rules: a ``<video>`` that ends the first human
message moves to its front (:func:`place_video_token`), a leading assistant turn is dropped, roles
must alternate, and a trailing human turn without an answer is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

from panda.choices import Choice
from panda.errors import RecordError

# ``data.on_bad_record``: a malformed record is skipped (counted, listed in the rejects) or stops the read.
# ``raise`` is a Python keyword, so this choice is built with the functional API
OnBadRecord = Choice("OnBadRecord", {"skip": "skip", "raise": "raise"}, module=__name__, qualname="OnBadRecord")

log = logging.getLogger(__name__)

VIDEO_TOKEN = "<video>"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


@dataclass
class VideoRecord:
    id: str
    video: str  # path relative to the video root
    turns: list[tuple[str, str]]  # [(question, answer), ...]; question 0 holds "<video>" once
    meta: dict = field(default_factory=dict)  # unknown extra fields, kept
    source: str = ""  # "annotation file#record index": where the record came from


def normalize_conversation(conversations, source="<records>", index=0) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(source, index, "'conversations' must be a non-empty list of {from, value}")
    msgs = []
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(source, index, f"turn {j} must be an object with 'from' and 'value'")
        role, value = str(turn["from"]).lower(), turn["value"]
        if not isinstance(value, str):
            raise RecordError(source, index, f"turn {j}: 'value' must be a string, got {type(value).__name__}")
        if role in HUMAN_ROLES:
            msgs.append(("human", value))
        elif role in ASSISTANT_ROLES:
            msgs.append(("gpt", value))
        else:
            raise RecordError(source, index, f"turn {j}: unknown role {turn['from']!r} (use human/gpt)")
    while msgs and msgs[0][0] == "gpt":  # a conversation that starts with the assistant drops that turn
        msgs.pop(0)
    if msgs and msgs[-1][0] == "human":  # an unanswered question supervises nothing
        msgs.pop()
    if not msgs:
        raise RecordError(source, index, "no human/gpt exchange in 'conversations'", code="empty_conversation")
    turns = []
    for j in range(0, len(msgs), 2):
        if msgs[j][0] != "human" or j + 1 >= len(msgs) or msgs[j + 1][0] != "gpt":
            raise RecordError(source, index, "roles must alternate human, gpt, human, gpt, ...")
        turns.append((msgs[j][1], msgs[j + 1][1]))
    count = sum(q.count(VIDEO_TOKEN) + a.count(VIDEO_TOKEN) for q, a in turns)
    if count > 1 or any(VIDEO_TOKEN in a for _, a in turns) or any(VIDEO_TOKEN in q for q, _ in turns[1:]):
        raise RecordError(source, index, f"'{VIDEO_TOKEN}' must appear once, in the first human turn")
    turns[0] = (place_video_token(turns[0][0]), turns[0][1])
    first = turns[0][0].replace(VIDEO_TOKEN, "").strip()
    if any(not q.strip() or not a.strip() for q, a in turns[1:]) or not first or not turns[0][1].strip():
        raise RecordError(source, index, "empty question or answer text", code="empty_conversation")
    return turns


def place_video_token(message: str) -> str:
    """Where ``<video>`` stands in the first human message, by the release's rule: a message that
    *ends* with it has it moved to the front (``<video>\\n`` + the rest, stripped); anywhere else it
    stays where the annotator put it. A message without it gets it in front (the release would
    train such a record without its video). A trailing ``<video>`` not preceded by a newline is
    moved too (the release would keep it and add a second one: twice the frames' placeholders)."""
    if VIDEO_TOKEN not in message:
        return f"{VIDEO_TOKEN}\n{message.strip()}"
    if not message.endswith(VIDEO_TOKEN):
        return message
    rest = message.replace("\n" + VIDEO_TOKEN, "").strip()
    rest = rest.replace(VIDEO_TOKEN, "").strip()
    return f"{VIDEO_TOKEN}\n{rest}".strip()


def parse_record(raw, source="<records>", index=0) -> VideoRecord:
    if not isinstance(raw, dict):
        raise RecordError(source, index, f"record must be a JSON object, got {type(raw).__name__}")
    if "video" not in raw:
        kind = "image" if "image" in raw else "text-only"
        raise RecordError(source, index, f"{kind} record (no 'video' key); panda trains on video records")
    if not isinstance(raw["video"], str) or not raw["video"]:
        raise RecordError(source, index, "'video' must be a non-empty relative path")
    turns = normalize_conversation(raw.get("conversations"), source, index)
    meta = {k: v for k, v in raw.items() if k not in ("id", "video", "conversations")}
    return VideoRecord(str(raw.get("id", f"{os.path.basename(str(source))}:{index}")), raw["video"], turns, meta)


def _lone_surrogate(value) -> bool:
    """True if a string (anywhere inside ``value``) holds text that is not valid UTF-8: bytes the
    file decoder could not read (surrogate-escaped) or a ``\\ud800``-style escape without its pair."""
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


def iter_json_records(path: str | os.PathLike):
    """Yield ``(index, raw)`` for each element of the JSON list in ``path``, one at a time.

    A syntax error raises :class:`RecordError` naming the file, the record index and the line and
    column, so a 1 GB annotation file with one bad comma is fixable without a JSON linter. Bytes
    that are not UTF-8 are let through as surrogate escapes; :func:`check_text` rejects those
    records one by one instead of failing the whole file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"annotation file not found: {path} (check data.train_records / data.root / --records)")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, 0).end()
    if text.startswith("\ufeff", pos):  # a UTF-8 byte-order mark
        pos = ws.match(text, pos + 1).end()
    if not text.startswith("[", pos):
        raise RecordError(path, "-", "the file must hold a JSON list of records ([{...}, {...}])")
    pos = ws.match(text, pos + 1).end()
    index = 0
    if text.startswith("]", pos):
        return
    while True:
        try:
            raw, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise RecordError(path, index, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
        yield index, raw
        index += 1
        pos = ws.match(text, pos).end()
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            line = text.count("\n", 0, pos) + 1
            raise RecordError(path, index, f"invalid JSON at line {line}: expected ',' or ']' after record {index - 1}")
        pos = ws.match(text, pos + 1).end()
    if text[ws.match(text, pos + 1).end():].strip():
        raise RecordError(path, index, "unexpected text after the closing ']' of the record list")


class RecordReader:
    """Reads records from one or more files: each malformed record becomes a reject with a short
    ``code`` (``malformed_record``, ``empty_conversation``, ``non_utf8_text``, ``duplicate_id``)
    and its reason; ids must be unique across all files read by one reader."""

    def __init__(self, on_error: str = "skip"):
        self.on_error = OnBadRecord.parse(on_error, "on_error")
        self.seen: set[str] = set()

    def classify(self, raw, path: str, index: int) -> VideoRecord:
        if _lone_surrogate(raw):
            raise RecordError(path, index, "text is not valid UTF-8 (re-encode the annotation file)", code="non_utf8_text")
        if isinstance(raw, dict) and isinstance(raw.get("video"), str) and raw.get("conversations") in ([], None, ""):
            raise RecordError(path, index, "'conversations' is empty", code="empty_conversation")
        rec = parse_record(raw, path, index)
        rec.source = f"{path}#{index}"
        if rec.id in self.seen:
            raise RecordError(path, index, f"duplicate id {rec.id!r} (its first record is kept)", code="duplicate_id")
        self.seen.add(rec.id)
        return rec

    def read(self, path: str | os.PathLike):
        """Yield ``(index, record, reject)``; exactly one of ``record`` / ``reject`` is set."""
        path = os.fspath(path)
        for index, raw in iter_json_records(path):
            try:
                yield index, self.classify(raw, path, index), None
            except RecordError as exc:
                if self.on_error == "raise":
                    raise
                rid = raw.get("id") if isinstance(raw, dict) else None
                yield index, None, {"index": index, "id": None if _lone_surrogate(rid) else rid, "code": exc.code, "reason": exc.reason}


def load_records(paths: str | os.PathLike | list, on_error: str = "skip") -> tuple[list[VideoRecord], list[dict]]:
    """Read one JSON list of records, or several (ids unique across them). Returns (records, rejects).

    ``on_error="raise"`` stops at the first malformed record; ``"skip"`` keeps going and returns
    each reject as ``{"index", "id", "code", "reason", "source"}`` (and logs how many). Invalid
    JSON always raises, naming the file and the record index.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    reader = RecordReader(on_error)
    records, rejects = [], []
    for path in paths:
        for _, rec, reject in reader.read(path):
            if rec is not None:
                records.append(rec)
            else:
                rejects.append(dict(reject, source=os.fspath(path)))
    if rejects:
        log.warning("%s: skipped %d malformed record(s) of %d; first: %s", ", ".join(map(os.fspath, paths)),
                    len(rejects), len(records) + len(rejects), rejects[0])
    return records, rejects


@dataclass
class QAItem:
    """One open-ended VideoQA question (the GPT_Zero_Shot_QA layout: docs/recipe-reference.md, "Open-ended VideoQA")."""

    question_id: str
    video: str
    question: str
    answer: str
    type: str | None = None


def load_qa(questions_path: str, answers_path: str) -> list[QAItem]:
    """Read ``test_q.json`` + ``test_a.json`` (same order, joined on ``question_id``)."""
    with open(questions_path, encoding="utf-8") as f:
        questions = json.load(f)
    with open(answers_path, encoding="utf-8") as f:
        answers = {str(a["question_id"]): a for a in json.load(f)}
    items = []
    for i, q in enumerate(questions):
        qid = str(q.get("question_id"))
        if qid not in answers:
            raise RecordError(answers_path, i, f"no answer for question_id {qid!r}")
        a = answers[qid]
        items.append(QAItem(qid, q["video_name"], q["question"], str(a["answer"]), a.get("type")))
    return items
