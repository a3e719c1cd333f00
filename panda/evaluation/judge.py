"""Judges of open-ended answers (docs/recipe-reference.md, "LLM judge"): an LLM behind any OpenAI-compatible chat API,
or normalised exact match offline.

The LLM judge is pinned, cached and fault tolerant:

- the exact ``judge.model`` (and every model id the server says it served) goes into the results;
  the API key is read from the environment variable ``judge.api_key_env`` and never stored;
- prompts are versioned (:data:`PROMPTS`, ``PROMPT_VERSION``) and overridable by a JSON file;
- at most ``judge.concurrency`` requests run at once; timeouts, 429 and 5xx are retried with
  exponential backoff and full jitter; other HTTP errors fail at once;
- the reply must parse strictly (a JSON object with the expected keys and ranges); one repair
  request is made if it does not; a reply that never parses is a *judge failure*, never a "no";
- with ``judge.structured_output`` the request carries the reply's JSON schema as the
  OpenAI-standard ``response_format`` (OpenAI, vLLM, SGLang and llama.cpp servers constrain the
  reply to it), with temperature 0 and a fixed ``seed``;
- the **fingerprint** (model id, revision, prompt version, decoding settings, schema) keys the
  SQLite verdict cache with the task, question, reference and prediction — a changed revision or
  setting never reuses an old verdict — and goes into ``results.json`` with every model id the
  server said it served. A re-run makes no API calls; runs share a cache. Transport failures are
  not cached: the next run tries them again;
- a server that does not know the model stops the run with one line naming it and the presets.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from panda.config import JudgeConfig
from panda.errors import PandaError
from panda.evaluation.qa import exact_match
from panda.registry import Registry

log = logging.getLogger(__name__)

PROMPT_VERSION = "panda-judge-v1"

# Prompts in the project's own words. {question} {reference} {prediction} (and for consistency
# {question2} {prediction2}) are filled in; every reply is one JSON object.
_SYSTEM = (
    "You grade answers that a video assistant gave to questions about videos. You see the question, "
    "the correct answer and the assistant's answer, never the video. Judge meaning, not wording: "
    "synonyms and paraphrases count as matching. Reply with one JSON object and nothing else."
)
_CRITERION = (
    "Question: {question}\nCorrect answer: {reference}\nAssistant's answer: {prediction}\n\n"
    "Rate the assistant's answer for {criterion} on an integer scale from 0 (worst) to 5 (best). "
    'Reply exactly as {{"score": <integer 0-5>}}.'
)
PROMPTS: dict[str, dict[str, str]] = {
    "qa": {
        "system": _SYSTEM,
        "user": (
            "Question: {question}\nCorrect answer: {reference}\nAssistant's answer: {prediction}\n\n"
            "Does the assistant's answer match the correct answer in meaning? Also rate how well it "
            'matches on an integer scale from 0 (not at all) to 5 (perfectly). Reply exactly as '
            '{{"pred": "yes" or "no", "score": <integer 0-5>}}.'
        ),
    },
    "correctness": {"system": _SYSTEM, "user": _CRITERION.replace("{criterion}", "factual correctness: does it state only things the correct answer supports, without errors")},
    "detail": {"system": _SYSTEM, "user": _CRITERION.replace("{criterion}", "detail orientation: does it cover the points of the correct answer completely and specifically")},
    "context": {"system": _SYSTEM, "user": _CRITERION.replace("{criterion}", "contextual understanding: does it fit the overall context the correct answer describes")},
    "temporal": {"system": _SYSTEM, "user": _CRITERION.replace("{criterion}", "temporal understanding: does it get the order and timing of events right")},
    "consistency": {
        "system": _SYSTEM,
        "user": (
            "Two phrasings of one question were asked about the same video.\nQuestion 1: {question}\n"
            "Answer 1: {prediction}\nQuestion 2: {question2}\nAnswer 2: {prediction2}\nCorrect answer: {reference}\n\n"
            "Rate on an integer scale from 0 to 5 how consistent the two answers are with each other and with "
            'the correct answer. Reply exactly as {{"score": <integer 0-5>}}.'
        ),
    },
}
REPAIR = 'Your reply could not be read. Reply again with only the JSON object, for example {example}.'

# the replies' shapes, sent as response_format when judge.structured_output is on
SCHEMAS = {
    "qa": {"type": "object", "properties": {"pred": {"type": "string", "enum": ["yes", "no"]},
                                            "score": {"type": "integer", "minimum": 0, "maximum": 5}},
           "required": ["pred", "score"], "additionalProperties": False},
    "score": {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 5}},
              "required": ["score"], "additionalProperties": False},
}
PRESETS = "judge=openai (OpenAI, a dated snapshot) or judge=qwen3_8b_vllm (an open-weights judge on your own server)"


class JudgeModelNotFound(PandaError):
    """The judge server does not serve the configured model (retired, misspelt, or not loaded)."""


class JudgeUnreachable(PandaError):
    """Nothing answers at the judge's address (a local server not started, a wrong port)."""


def judge_fingerprint(cfg: JudgeConfig, prompt_version: str) -> dict:
    """Everything that decides a verdict besides the item: what the cache is keyed by and
    ``results.json`` records (plus the model ids the server reports, known after the calls)."""
    return {"model": cfg.model, "revision": cfg.revision, "prompt_version": prompt_version,
            "temperature": cfg.temperature, "seed": cfg.seed, "max_tokens": cfg.max_tokens,
            "schema": hashlib.sha256(json.dumps(SCHEMAS, sort_keys=True).encode()).hexdigest()[:12]
            if cfg.structured_output else None,
            "extra": json.loads(json.dumps(cfg.extra, sort_keys=True, default=str)) or None}


def fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class JudgeTask:
    """One request to the judge: ``task`` is ``qa`` or a criterion of the Video-ChatGPT benchmark."""

    task: str
    question: str
    reference: str
    prediction: str
    question2: str = ""
    prediction2: str = ""


@dataclass
class Verdict:
    ok: bool
    pred: Optional[str] = None  # "yes" | "no" (qa only)
    score: Optional[int] = None
    reason: str = ""  # why it failed
    cached: bool = False
    served_model: Optional[str] = None


class ReplyError(ValueError):
    pass


def parse_reply(text: str, task: str) -> tuple[Optional[str], int]:
    """Strict: one JSON (or Python-literal) object; qa needs pred yes/no and an integer score 0–5."""
    match = re.search(r"\{.*\}", text or "", re.S)
    if not match:
        raise ReplyError(f"no object in reply {text[:80]!r}")
    raw = match.group(0)
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        try:
            obj = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as exc:
            raise ReplyError(f"unreadable object {raw[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ReplyError(f"not an object: {raw[:80]!r}")
    score = obj.get("score")
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score.strip())
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5:
        raise ReplyError(f"score must be an integer 0-5, got {score!r}")
    if task != "qa":
        return None, score
    pred = str(obj.get("pred", "")).strip().lower()
    if pred not in ("yes", "no"):
        raise ReplyError(f"pred must be yes or no, got {obj.get('pred')!r}")
    return pred, score


def load_prompts(path: Optional[str]) -> tuple[str, dict]:
    if not path:
        return PROMPT_VERSION, PROMPTS
    with open(path) as f:
        raw = json.load(f)
    if "version" not in raw or "prompts" not in raw:
        raise ValueError(f"{path}: a prompt file needs 'version' and 'prompts' ({{task: {{system, user}}}})")
    return str(raw["version"]), {**PROMPTS, **raw["prompts"]}


class JudgeCache:
    """SQLite verdict cache; safe across the judge's threads and across processes sharing the file."""

    def __init__(self, path: Optional[str]):
        self.path = os.path.expanduser(path) if path else None
        self.lock = threading.Lock()
        self.hits = self.misses = 0
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, model TEXT, prompt_version TEXT, "
                           "task TEXT, verdict TEXT, created REAL)")

    def _connect(self):
        return sqlite3.connect(self.path, timeout=60)

    @staticmethod
    def key(model: str, version: str, task: JudgeTask) -> str:
        fields = [model, version, task.task, task.question, task.reference, task.prediction, task.question2, task.prediction2]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    def get(self, key: str) -> Optional[Verdict]:
        if not self.path:
            return None
        with self.lock, self._connect() as db:
            row = db.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return Verdict(**json.loads(row[0]), cached=True)

    def put(self, key: str, model: str, version: str, task: str, verdict: Verdict) -> None:
        if not self.path:
            return
        data = {"ok": verdict.ok, "pred": verdict.pred, "score": verdict.score, "reason": verdict.reason,
                "served_model": verdict.served_model}
        with self.lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?)",
                       (key, model, version, task, json.dumps(data), time.time()))


# The judges (``judge=`` / ``judge.kind``): each a class built from the JudgeConfig, with ``model``,
# ``prompt_version``, ``api_calls``, ``served_models``, ``cache`` and ``judge_all(tasks, desc) -> [Verdict]``.
# Adding one = a class decorated with @JUDGES.register("kind") + one yaml in a judge config folder.
JUDGES: Registry[type] = Registry("judge", "judge.kind", "panda.evaluation.judge.JUDGES")


@JUDGES.register("exact_match")
class ExactMatchJudge:
    """Offline: normalised exact match. ``yes``/5 on a match, ``no``/0 otherwise (qa tasks only)."""

    model = "exact_match"
    prompt_version = "exact_match"

    def __init__(self, cfg: JudgeConfig | None = None):
        self.api_calls = 0
        self.served_models: set[str] = set()
        self.cache = JudgeCache(None)

    def judge_all(self, tasks: list[JudgeTask], desc: str = "judging") -> list[Verdict]:
        out = []
        for t in tasks:
            if t.task != "qa":
                out.append(Verdict(False, reason=f"exact match cannot grade {t.task!r}; use judge=openai"))
                continue
            hit = exact_match(t.prediction, t.reference)
            out.append(Verdict(True, "yes" if hit else "no", 5 if hit else 0))
        return out


class _TransportFailure(Exception):
    """The request could not be completed (retries exhausted, or a status retrying cannot fix)."""


@JUDGES.register("openai")
class OpenAIJudge:
    """An LLM judge behind any OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, cfg: JudgeConfig):
        import openai

        self.cfg = cfg
        self.model = cfg.model
        self.prompt_version, self.prompts = load_prompts(cfg.prompt_file)
        self.fingerprint = judge_fingerprint(cfg, self.prompt_version)
        self.fingerprint_id = fingerprint_id(self.fingerprint)  # the cache's model field: model + revision + settings
        key = os.environ.get(cfg.api_key_env)
        if not key:
            if cfg.base_url is None:
                raise ValueError(f"judge=openai needs an API key in the environment variable {cfg.api_key_env}")
            key = "unused"  # local OpenAI-compatible servers usually ignore it
        # retries are done here (backoff with jitter, per-status rules), not by the client
        self.client = openai.OpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=0)
        self.openai = openai
        self.cache = JudgeCache(cfg.cache)
        self.api_calls = 0
        self.served_models: set[str] = set()
        self._lock = threading.Lock()
        self._reachable = False
        self._reach_lock = threading.Lock()

    # ---------------------------------------------------------------- one request, with retries
    def _request_fields(self, task: str) -> dict:
        fields = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        if self.cfg.seed is not None:
            fields["seed"] = self.cfg.seed
        if self.cfg.structured_output:
            name = "qa" if task == "qa" else "score"
            fields["response_format"] = {"type": "json_schema", "json_schema": {
                "name": f"panda_verdict_{name}", "schema": SCHEMAS[name], "strict": True}}
        return {**fields, **self.cfg.extra}

    def _chat(self, messages: list[dict], task: str = "qa") -> tuple[str, Optional[str]]:
        self._check_reachable()  # once, before the first request
        o = self.openai
        delay = self.cfg.backoff_s
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            with self._lock:
                self.api_calls += 1
            try:
                resp = self.client.chat.completions.create(model=self.model, messages=messages, **self._request_fields(task))
                text = resp.choices[0].message.content if resp.choices else None
                return text or "", getattr(resp, "model", None)
            except (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError) as exc:
                last = f"{type(exc).__name__}: {str(exc)[:120]}"
            except o.APIStatusError as exc:
                if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                    last = f"HTTP {exc.status_code}"
                elif exc.status_code == 404 or "model_not_found" in str(exc) or "does not exist" in str(exc):
                    where = self.cfg.base_url or "the OpenAI API"
                    raise JudgeModelNotFound(
                        f"the judge server ({where}) does not serve judge.model={self.model!r} (HTTP {exc.status_code}: "
                        f"{str(exc)[:120]}); it may be retired or not loaded: set judge.model, or use a preset: {PRESETS}"
                    ) from None
                else:  # 400 / 401 / 403: retrying will not help
                    raise _TransportFailure(f"HTTP {exc.status_code}: {str(exc)[:160]}") from None
            if attempt < self.cfg.max_retries:
                time.sleep(random.uniform(0, min(self.cfg.backoff_max_s, delay)))  # full jitter
                delay *= 2
        raise _TransportFailure(f"gave up after {self.cfg.max_retries + 1} attempts: {last}")

    def judge_one(self, task: JudgeTask) -> Verdict:
        key = JudgeCache.key(self.fingerprint_id, self.prompt_version, task)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        prompt = self.prompts[task.task]
        fields = {"question": task.question, "reference": task.reference, "prediction": task.prediction,
                  "question2": task.question2, "prediction2": task.prediction2}
        messages = [{"role": "system", "content": prompt["system"]}, {"role": "user", "content": prompt["user"].format(**fields)}]
        try:
            text, served = self._chat(messages, task.task)
            try:
                pred, score = parse_reply(text, task.task)
            except ReplyError as first:
                example = '{"pred": "yes", "score": 4}' if task.task == "qa" else '{"score": 4}'
                messages += [{"role": "assistant", "content": text}, {"role": "user", "content": REPAIR.format(example=example)}]
                text, served = self._chat(messages, task.task)
                try:
                    pred, score = parse_reply(text, task.task)
                except ReplyError as second:
                    verdict = Verdict(False, reason=f"unparseable reply ({first}; after repair: {second})", served_model=served)
                    self.cache.put(key, self.model, self.prompt_version, task.task, verdict)
                    return verdict
        except _TransportFailure as exc:
            return Verdict(False, reason=str(exc))  # transport failure: not cached, retried next run
        verdict = Verdict(True, pred, score, served_model=served)
        self.cache.put(key, self.model, self.prompt_version, task.task, verdict)
        return verdict

    def _check_reachable(self) -> None:
        """Before the first request: a refused connection stops the run at once, naming the address,
        instead of every item retrying with backoff. Anything else (a slow server, no /models route)
        is left to the requests themselves."""
        with self._reach_lock:
            if not self._reachable:
                self._probe()
                self._reachable = True

    def _probe(self) -> None:
        o = self.openai
        try:
            self.client.with_options(timeout=5.0, max_retries=0).models.list()
        except o.APITimeoutError:
            pass
        except o.APIConnectionError as exc:
            where = self.cfg.base_url or "the OpenAI API"
            raise JudgeUnreachable(
                f"cannot reach the judge at {where} ({type(exc).__name__}: {str(exc)[:100]}): start the server "
                f"(conf/judge/qwen3_8b_vllm.yaml shows how) or set judge.base_url") from None
        except Exception:  # noqa: BLE001 - the server answered (maybe without /models): requests will tell
            pass

    def judge_all(self, tasks: list[JudgeTask], desc: str = "judging") -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            verdicts = list(tqdm(pool.map(self.judge_one, tasks), total=len(tasks), desc=desc, leave=False))
        self.served_models |= {v.served_model for v in verdicts if v.served_model}
        return verdicts


def build_judge(cfg: JudgeConfig):
    """The judge registered as ``cfg.kind``."""
    return JUDGES[cfg.kind](cfg)
