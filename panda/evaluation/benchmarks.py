"""Evaluation benchmarks (docs/recipe-reference.md, "Evaluation"): what to generate and how to judge it.

Each benchmark kind is one :class:`Benchmark` subclass registered under its ``kind`` name:

- ``qa``: open-ended zero-shot VideoQA in the GPT_Zero_Shot_QA layout (``test_q.json``,
  ``test_a.json``, ``videos/``): MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA, and the synthetic
  held-out split. One generation and one judge request (yes/no + score) per question.
- ``vcgbench``: the Video-ChatGPT benchmark: generic questions (judged for correctness, detail
  and context), temporal questions (temporal) and consistency pairs (two phrasings, both answered,
  judged together against the one reference).

Adding a kind = one subclass decorated with ``@BENCHMARKS.register("kind")`` (``load``,
``judge_tasks``, ``summarise``) + one yaml in a benchmark config folder setting ``kind``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

from panda.config import BenchmarkConfig
from panda.data.records import QAItem, load_qa
from panda.errors import RecordError
from panda.evaluation.judge import JudgeTask
from panda.registry import Registry

VCG_CRITERIA = ("correctness", "detail", "context", "temporal", "consistency")

# Published Video-Panda numbers (docs/recipe-reference.md, "Published numbers"), for the comparison row of results.md
PUBLISHED_QA = {"msvd_qa": (64.7, 3.8), "msrvtt_qa": (54.8, 3.4), "tgif_qa": (42.9, 3.2), "activitynet_qa": (40.0, 3.3)}
PUBLISHED_VCG = {"correctness": 2.74, "detail": 2.47, "context": 3.01, "temporal": 2.26, "consistency": 2.36, "average": 2.57}
QA_TITLES = {"msvd_qa": "MSVD-QA", "msrvtt_qa": "MSRVTT-QA", "tgif_qa": "TGIF-QA", "activitynet_qa": "ActivityNet-QA"}


@dataclass
class GenItem:
    """One generation: a question about a video."""

    uid: str  # unique within the benchmark (the predictions file is keyed by it)
    video: str  # file name as the benchmark gives it (resolved with find_video)
    question: str


BENCHMARKS: Registry[type["Benchmark"]] = Registry("benchmark kind", "benchmark.<name>.kind",
                                                   "panda.evaluation.benchmarks.BENCHMARKS")


@dataclass
class Benchmark:
    """Generation items of one benchmark, and how their verdicts become metrics."""

    cfg: BenchmarkConfig
    items: list[GenItem]
    video_dir: str

    @classmethod
    def load(cls, cfg: BenchmarkConfig, root: str) -> "Benchmark":
        """Read and check the benchmark's files under ``root`` (errors name the file and the fix)."""
        raise NotImplementedError

    @property
    def num_questions(self) -> int:
        return len(self.items)

    def judge_tasks(self, predictions: dict[str, str]) -> list[tuple[str, str, JudgeTask]]:
        """(group, criterion, task) for every judgeable item; items without a prediction are skipped."""
        raise NotImplementedError

    def summarise(self, ok: list[tuple[str, str, object]]) -> dict:
        """Metrics from the successful verdicts ``(group, criterion, verdict)``."""
        raise NotImplementedError

    def question_types(self) -> dict[str, str]:
        """Question id -> question type, where the benchmark has types."""
        return {}


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def bootstrap_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[float] | None:
    """The 95% percentile bootstrap interval of the mean of ``values`` (one per question), seeded:
    the same verdicts always give the same interval. None for fewer than two values."""
    import numpy as np

    x = np.asarray(list(values), dtype=float)
    if len(x) < 2:
        return None
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [round(float(lo), 6), round(float(hi), 6)]


def _qa_summary(verdicts) -> dict:
    yes = [float(v.pred == "yes") for v in verdicts]
    scores = [v.score for v in verdicts]
    return {"accuracy": sum(yes) / len(verdicts) if verdicts else None, "accuracy_ci95": bootstrap_ci(yes),
            "score": sum(scores) / len(verdicts) if verdicts else None, "score_ci95": bootstrap_ci(scores),
            "judged": len(verdicts)}


@BENCHMARKS.register("qa")
@dataclass
class QABenchmark(Benchmark):
    qa: list[QAItem] = field(default_factory=list)  # the references and question types

    @classmethod
    def load(cls, cfg: BenchmarkConfig, root: str) -> "QABenchmark":
        qa_dir = os.path.join(root, cfg.qa_dir or "")
        qa = load_qa(os.path.join(qa_dir, "test_q.json"), os.path.join(qa_dir, "test_a.json"))
        if cfg.limit:
            qa = qa[: cfg.limit]
        items = [GenItem(q.question_id, q.video, q.question) for q in qa]
        return cls(cfg, items, os.path.join(qa_dir, "videos"), qa=qa)

    @property
    def num_questions(self) -> int:
        return len(self.qa)

    def judge_tasks(self, predictions: dict[str, str]) -> list[tuple[str, str, JudgeTask]]:
        return [(q.question_id, "qa", JudgeTask("qa", q.question, q.answer, predictions[q.question_id]))
                for q in self.qa if q.question_id in predictions]

    def question_types(self) -> dict[str, str]:
        return {q.question_id: str(q.type) for q in self.qa if q.type is not None}

    def summarise(self, ok: list[tuple[str, str, object]]) -> dict:
        """accuracy = yes / judged, score = mean 0–5 score; and per question type
        ``accuracy_<type>``, ``score_<type>``, ``judged_<type>``."""
        out = _qa_summary([v for _, _, v in ok])
        types = {q.question_id: q.type for q in self.qa}
        by_type = defaultdict(list)
        for group, _, v in ok:
            if types.get(group) is not None:
                by_type[str(types[group])].append(v)
        for t, vs in sorted(by_type.items()):
            out.update({f"{k}_{t}": v for k, v in _qa_summary(vs).items()})
        return out


def _read_list(path: str, keys: tuple[str, ...]) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"benchmark file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise RecordError(path, "-", "expected a JSON list of records")
    for i, rec in enumerate(data):
        missing = [k for k in keys if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise RecordError(path, i, f"missing {missing}")
    return data


@BENCHMARKS.register("vcgbench")
@dataclass
class VCGBenchmark(Benchmark):
    vcg: dict = field(default_factory=dict)  # {"generic": [...], "temporal": [...], "consistency": [...]}

    @classmethod
    def load(cls, cfg: BenchmarkConfig, root: str) -> "VCGBenchmark":
        for key in ("generic", "temporal", "consistency"):
            if not getattr(cfg, key):
                raise ValueError(f"benchmark {cfg.name}: set benchmark.{cfg.name}.{key} (a JSON file under the root)")
        vcg = {
            "generic": _read_list(os.path.join(root, cfg.generic), ("video_name", "Q", "A")),
            "temporal": _read_list(os.path.join(root, cfg.temporal), ("video_name", "Q", "A")),
            "consistency": _read_list(os.path.join(root, cfg.consistency), ("video_name", "Q1", "Q2", "A")),
        }
        if cfg.limit:
            vcg = {k: v[: cfg.limit] for k, v in vcg.items()}
        items = [GenItem(f"{part}/{i}", r["video_name"], r["Q"]) for part in ("generic", "temporal") for i, r in enumerate(vcg[part])]
        for i, r in enumerate(vcg["consistency"]):
            items += [GenItem(f"consistency/{i}/1", r["video_name"], r["Q1"]), GenItem(f"consistency/{i}/2", r["video_name"], r["Q2"])]
        return cls(cfg, items, os.path.join(root, cfg.video_dir or "videos"), vcg=vcg)

    def judge_tasks(self, predictions: dict[str, str]) -> list[tuple[str, str, JudgeTask]]:
        out = []
        for i, rec in enumerate(self.vcg["generic"]):
            uid = f"generic/{i}"
            if uid in predictions:
                for crit in ("correctness", "detail", "context"):
                    out.append((uid, crit, JudgeTask(crit, rec["Q"], rec["A"], predictions[uid])))
        for i, rec in enumerate(self.vcg["temporal"]):
            uid = f"temporal/{i}"
            if uid in predictions:
                out.append((uid, "temporal", JudgeTask("temporal", rec["Q"], rec["A"], predictions[uid])))
        for i, rec in enumerate(self.vcg["consistency"]):
            a, b = f"consistency/{i}/1", f"consistency/{i}/2"
            if a in predictions and b in predictions:
                out.append((f"consistency/{i}", "consistency",
                            JudgeTask("consistency", rec["Q1"], rec["A"], predictions[a], rec["Q2"], predictions[b])))
        return out

    def summarise(self, ok: list[tuple[str, str, object]]) -> dict:
        """The five criteria's mean scores and their average (when all five have scores)."""
        scores = defaultdict(list)
        for _, crit, v in ok:
            scores[crit].append(v.score)
        out = {crit: sum(scores[crit]) / len(scores[crit]) if scores[crit] else None for crit in VCG_CRITERIA}
        out.update({f"{crit}_ci95": bootstrap_ci(scores[crit]) for crit in VCG_CRITERIA})
        present = [out[c] for c in VCG_CRITERIA if out[c] is not None]
        out["average"] = sum(present) / len(present) if len(present) == len(VCG_CRITERIA) else None
        out["average_ci95"] = None
        if out["average"] is not None and all(len(scores[c]) > 1 for c in VCG_CRITERIA):
            # the average of the five means, each criterion's questions resampled independently (same seed)
            import numpy as np

            rng = np.random.default_rng(BOOTSTRAP_SEED)
            means = sum(np.asarray(scores[c], float)[rng.integers(0, len(scores[c]), size=(BOOTSTRAP_RESAMPLES, len(scores[c])))]
                        .mean(1) for c in VCG_CRITERIA) / len(VCG_CRITERIA)
            out["average_ci95"] = [round(float(v), 6) for v in np.percentile(means, [2.5, 97.5])]
        return out


def load_benchmark(cfg: BenchmarkConfig) -> Benchmark:
    """The benchmark ``cfg`` names, its files read and checked."""
    if cfg.kind not in BENCHMARKS:
        raise ValueError(f"benchmark {cfg.name}: kind={cfg.kind!r}; use one of {BENCHMARKS.names()} (or register "
                         "one: @BENCHMARKS.register, panda.evaluation.benchmarks, in a module listed in plugins=[...])")
    if not cfg.root:
        raise ValueError(f"benchmark {cfg.name}: set benchmark.{cfg.name}.root=/path/to/eval/DATA_ROOT")
    return BENCHMARKS[cfg.kind].load(cfg, os.path.abspath(cfg.root))


# ---------------------------------------------------------------------------- multiple choice

OPTION_LETTERS = "ABCDEFGH"
NO_OPTION = "(no option)"  # judged against a letter: never equal (an empty string would normalise like "A", an article)
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# The paper's Table 11 (docs/recipe-reference.md, "Table 11: long videos"): accuracy % and the duration
# split it was measured on (Video-MME: the medium-length videos), which results.md sets beside it
PUBLISHED_MCQ: dict[str, tuple[float, str | None]] = {"egoschema": (36.4, None), "videomme": (37.9, "medium")}
MCQ_TITLES = {"egoschema": "EgoSchema", "videomme": "Video-MME"}


@dataclass
class MCQItem:
    uid: str
    video: str
    question: str
    options: list[str]  # option texts, without their letters
    answer: int | None  # index of the correct option; None where the benchmark keeps it hidden
    groups: dict = field(default_factory=dict)  # e.g. {"duration": "short", "task_type": "Counting Problem"}


def mcq_prompt(question: str, options: list[str]) -> str:
    """The question with its lettered options and the instruction, as lmms-eval-style video MCQ asks."""
    lines = [question.strip(), "Options:"] + [f"({OPTION_LETTERS[i]}) {o.strip()}" for i, o in enumerate(options)]
    return "\n".join(lines + [MCQ_INSTRUCTION])


def parse_choice(text: str, options: list[str]) -> int | None:
    """Strict: the answer *is* an option — its letter (``B``, ``(B)``, ``B.``, ``B) ...``, ``B: ...``)
    or exactly one option's text; anything else (``I think B``) is None, and log-likelihood decides."""
    import re

    t = (text or "").strip()
    m = re.match(r"^\(?([A-H])\)?(?:[.:)]|\s|$)", t)
    if m and OPTION_LETTERS.index(m.group(1)) < len(options):
        return OPTION_LETTERS.index(m.group(1))
    norm = " ".join(re.sub(r"[^a-z0-9 ]", " ", t.lower()).split())
    hits = [i for i, o in enumerate(options) if norm and norm == " ".join(re.sub(r"[^a-z0-9 ]", " ", o.lower()).split())]
    return hits[0] if len(hits) == 1 else None


def _read_json_or_lines(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"benchmark file not found: {path}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _load_egoschema(cfg: BenchmarkConfig, root: str) -> tuple[list[MCQItem], str]:
    """EgoSchema's release layout: ``questions.json`` (``q_uid``, ``question``, ``option 0`` ..
    ``option 4``), ``subset_answers.json`` ({q_uid: index}, the 500 public answers), ``videos/<q_uid>.mp4``."""
    qpath = os.path.join(root, cfg.questions or "questions.json")
    questions = _read_json_or_lines(qpath)
    answers = _read_json_or_lines(os.path.join(root, cfg.answers or "subset_answers.json"))
    items = []
    for i, q in enumerate(questions):
        missing = [k for k in ("q_uid", "question", "option 0") if k not in q]
        if missing:
            raise RecordError(qpath, i, f"missing {missing}")
        if q["q_uid"] not in answers:
            continue  # the full set's answers are hidden (scored by the benchmark's server): not scored here
        options = [q[f"option {k}"] for k in range(len(OPTION_LETTERS)) if f"option {k}" in q]
        items.append(MCQItem(q["q_uid"], f"{q['q_uid']}.mp4", q["question"], options, int(answers[q["q_uid"]])))
    return items, os.path.join(root, cfg.video_dir or "videos")


def _load_videomme(cfg: BenchmarkConfig, root: str) -> tuple[list[MCQItem], str]:
    """Video-MME's release (the Hugging Face dataset): ``videomme/test-00000-of-00001.parquet`` with
    ``videoID``, ``duration`` (short / medium / long), ``task_type``, ``question_id``, ``question``,
    ``options`` (["A. ...", ...]) and ``answer`` (a letter); videos ``data/<videoID>.mp4``. A JSON or
    JSON-lines export with the same fields reads without pyarrow."""
    qpath = os.path.join(root, cfg.questions or "videomme/test-00000-of-00001.parquet")
    if qpath.endswith(".parquet"):
        if not os.path.exists(qpath):
            raise FileNotFoundError(f"benchmark file not found: {qpath}")
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ValueError(f"{qpath}: reading parquet needs pyarrow (`pip install -c constraints.txt -e '.[benchmarks]'`), "
                             "or point benchmark.videomme.questions at a .json / .jsonl export") from exc
        rows = pq.read_table(qpath).to_pylist()
    else:
        rows = _read_json_or_lines(qpath)
    items = []
    for i, r in enumerate(rows):
        missing = [k for k in ("videoID", "question_id", "question", "options", "answer") if k not in r]
        if missing:
            raise RecordError(qpath, i, f"missing {missing}")
        options = [str(o).split(". ", 1)[1] if str(o)[:2] in {f"{x}." for x in OPTION_LETTERS} else str(o)
                   for o in r["options"]]
        answer = OPTION_LETTERS.index(str(r["answer"]).strip()[0]) if r.get("answer") else None
        items.append(MCQItem(str(r["question_id"]), f"{r['videoID']}.mp4", r["question"], options, answer,
                             {k: str(r[k]) for k in ("duration", "task_type") if r.get(k) is not None}))
    return items, os.path.join(root, cfg.video_dir or "data")


MCQ_LAYOUTS = {"egoschema": _load_egoschema, "videomme": _load_videomme}


@BENCHMARKS.register("mcq")
@dataclass
class MultipleChoiceBenchmark(Benchmark):
    """Video multiple choice (the paper's Table 11: EgoSchema, Video-MME). The model answers the
    question with its lettered options; a strict parser reads the letter, and where the answer names
    none the option letter the model ranks highest at the answer's first position decides
    (``choices.jsonl`` records which path decided each item). Scored offline by exact match."""

    mcq: list[MCQItem] = field(default_factory=list)
    choices: dict[str, dict] = field(default_factory=dict)  # uid -> {"choice", "decided_by"}

    @classmethod
    def load(cls, cfg: BenchmarkConfig, root: str) -> "MultipleChoiceBenchmark":
        if cfg.layout not in MCQ_LAYOUTS:
            raise ValueError(f"benchmark {cfg.name}: layout={cfg.layout!r}; use one of {sorted(MCQ_LAYOUTS)}")
        mcq, video_dir = MCQ_LAYOUTS[cfg.layout](cfg, root)
        mcq = [m for m in mcq if m.answer is not None]
        if cfg.limit:
            mcq = mcq[: cfg.limit]
        items = [GenItem(m.uid, m.video, mcq_prompt(m.question, m.options)) for m in mcq]
        return cls(cfg, items, video_dir, mcq=mcq)

    def judge_tasks(self, predictions: dict[str, str]) -> list[tuple[str, str, JudgeTask]]:
        out = []
        for m in self.mcq:
            if m.uid in self.choices:
                picked = self.choices[m.uid]["choice"]  # None: no option (loglikelihood=false), judged wrong
                out.append((m.uid, "qa", JudgeTask("qa", m.question, OPTION_LETTERS[m.answer],
                                                   NO_OPTION if picked is None else OPTION_LETTERS[picked])))
        return out

    def question_types(self) -> dict[str, str]:
        return {m.uid: ",".join(f"{k}={v}" for k, v in m.groups.items()) for m in self.mcq if m.groups}

    def summarise(self, ok: list[tuple[str, str, object]]) -> dict:
        """accuracy (and its interval) overall and per duration / task type; which path decided."""
        out = _qa_summary([v for _, _, v in ok])
        out.pop("score", None), out.pop("score_ci95", None)
        groups = {m.uid: m.groups for m in self.mcq}
        by: dict[str, list] = defaultdict(list)
        for uid, _, v in ok:
            for key, value in groups.get(uid, {}).items():
                by[f"{key}={value}"].append(v)
        for name, vs in sorted(by.items()):
            summary = _qa_summary(vs)
            out.update({f"accuracy_{name}": summary["accuracy"], f"accuracy_{name}_ci95": summary["accuracy_ci95"],
                        f"judged_{name}": summary["judged"]})
        decided = [c["decided_by"] for c in self.choices.values()]
        out["decided_by_parser"] = decided.count("parser")
        out["decided_by_loglikelihood"] = decided.count("loglikelihood")
        out["decided_by_none"] = decided.count("none")
        return out
