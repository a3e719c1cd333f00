"""Evaluation benchmarks (training.md §4): what to generate and how to judge it.

Each benchmark kind is one :class:`Benchmark` subclass registered under its ``kind`` name:

- ``qa``: open-ended zero-shot VideoQA in the GPT_Zero_Shot_QA layout (``test_q.json``,
  ``test_a.json``, ``videos/``): MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA, and the synthetic
  held-out split. One generation and one judge request (yes/no + score) per question.
- ``vcgbench``: the Video-ChatGPT benchmark: generic questions (judged for correctness, detail
  and context), temporal questions (temporal) and consistency pairs (two phrasings, both answered,
  judged together against the one reference).

Adding a kind = one subclass decorated with ``@register_benchmark("kind")`` (``load``,
``judge_tasks``, ``summarise``) + one yaml in ``conf/benchmark/`` setting ``kind``.
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

VCG_CRITERIA = ("correctness", "detail", "context", "temporal", "consistency")

# Published Video-Panda numbers (training.md §5), for the comparison row of results.md
PUBLISHED_QA = {"msvd_qa": (64.7, 3.8), "msrvtt_qa": (54.8, 3.4), "tgif_qa": (42.9, 3.2), "activitynet_qa": (40.0, 3.3)}
PUBLISHED_VCG = {"correctness": 2.74, "detail": 2.47, "context": 3.01, "temporal": 2.26, "consistency": 2.36, "average": 2.57}
QA_TITLES = {"msvd_qa": "MSVD-QA", "msrvtt_qa": "MSRVTT-QA", "tgif_qa": "TGIF-QA", "activitynet_qa": "ActivityNet-QA"}


@dataclass
class GenItem:
    """One generation: a question about a video."""

    uid: str  # unique within the benchmark (the predictions file is keyed by it)
    video: str  # file name as the benchmark gives it (resolved with find_video)
    question: str


BENCHMARKS: dict[str, type["Benchmark"]] = {}


def register_benchmark(kind: str):
    def add(cls):
        BENCHMARKS[kind] = cls
        return cls

    return add


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


@register_benchmark("qa")
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


@register_benchmark("vcgbench")
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
        raise ValueError(f"benchmark {cfg.name}: kind={cfg.kind!r}; use one of {sorted(BENCHMARKS)}")
    if not cfg.root:
        raise ValueError(f"benchmark {cfg.name}: set benchmark.{cfg.name}.root=/path/to/eval/DATA_ROOT")
    return BENCHMARKS[cfg.kind].load(cfg, os.path.abspath(cfg.root))
