"""How far apart are two judges on the same predictions?

    python -m panda.evaluation.agreement RUN_A RUN_B [--benchmark NAME] [--json OUT.json]

Each side is an ``evaluate.py`` run folder (its ``<benchmark>/judgements.jsonl``) or an archived
verdict file in the release's per-item format (Video-ChatGPT's judge scripts: a JSON object
``{id: [{"pred": "yes"|"no", "score": n}, {"q": ..., "a": ..., "pred": ...}]}``; name its
benchmark with ``--benchmark``). Items are matched by benchmark, question id and criterion; only
items both judges graded count. Per benchmark (and per question type where the run recorded
types) it prints raw agreement and Cohen's kappa on yes/no, the mean absolute score difference,
both accuracies and their difference with a 95% paired bootstrap interval (items resampled,
seeded), and lists the items where the verdicts differ. This is how to measure a new judge
against the verdicts the paper's retired GPT-3.5 gave.

Both sides should have judged the same predictions; where the files record them and they differ
(another checkpoint, other decoding settings), the numbers measure the answers as well as the
judges: the comparison says for how many questions, lists them with both predictions, and shows
both predictions beside each disagreement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

from panda.evaluation.benchmarks import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED


def read_run(folder: str) -> dict[tuple[str, str, str], dict]:
    """(benchmark, id, criterion) -> verdict row, for every judged item of a run folder."""
    items = {}
    for bench in sorted(os.listdir(folder)):
        path = os.path.join(folder, bench, "judgements.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc})") from exc
                if row.get("ok"):
                    items[(bench, str(row["id"]), row.get("criterion") or "qa")] = row
    if not items:
        raise ValueError(f"{folder}: no <benchmark>/judgements.jsonl with a judged item (is it an evaluate.py run folder?)")
    return items


def read_release_file(path: str, benchmark: str) -> dict[tuple[str, str, str], dict]:
    """The release's per-item verdicts: {id: [{"pred", "score"}, {"q", "a", "pred"}]}."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{id: [verdict, qa]}}, got {type(data).__name__}")
    items = {}
    for key, value in data.items():
        verdict, qa = (value[0], value[1] if len(value) > 1 else {}) if isinstance(value, list) else (value, {})
        pred = str(verdict.get("pred", "")).strip().lower()
        if pred not in ("yes", "no"):
            continue  # the release kept unparseable replies too: not a verdict
        items[(benchmark, str(key), "qa")] = {"pred": pred, "score": verdict.get("score"), "question": qa.get("q"),
                                              "reference": qa.get("a"), "prediction": qa.get("pred")}
    return items


def read_side(path: str, benchmark: str | None) -> dict[tuple[str, str, str], dict]:
    if os.path.isdir(path):
        return read_run(path)
    if not benchmark:
        raise ValueError(f"{path} is a verdict file: say which benchmark it judged with --benchmark NAME")
    return read_release_file(path, benchmark)


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters' yes/no labels on the same items."""
    if not a:
        return None
    x, y = np.array([v == "yes" for v in a]), np.array([v == "yes" for v in b])
    observed = float((x == y).mean())
    expected = float(x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean()))
    if expected == 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - expected) / (1 - expected)


def paired_difference_ci(a: np.ndarray, b: np.ndarray) -> list[float] | None:
    """95% percentile bootstrap interval of mean(b) - mean(a), items resampled together."""
    if len(a) < 2:
        return None
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))
    diffs = b[idx].mean(1) - a[idx].mean(1)
    return [round(float(v), 6) for v in np.percentile(diffs, [2.5, 97.5])]


def predictions_of(x: dict, y: dict) -> dict:
    """The prediction two verdicts judged, once when it is the same (or only one side recorded it),
    both when they differ: ``{"prediction": p}`` or ``{"prediction_a": p, "prediction_b": q}``."""
    pa, pb = x.get("prediction"), y.get("prediction")
    if pa is not None and pb is not None and pa != pb:
        return {"prediction_a": pa, "prediction_b": pb}
    return {"prediction": pa if pa is not None else pb}


def different_predictions(a: dict, b: dict, keys: list) -> dict:
    """The questions of ``keys`` whose two verdicts judged different predictions (a question with
    several criteria counts once, with its first differing pair): how many, of how many questions
    both sides recorded a prediction for, and each one's ``benchmark/id`` with both predictions."""
    recorded, differ = set(), {}
    for key in keys:
        question = f"{key[0]}/{key[1]}"
        if a[key].get("prediction") is None or b[key].get("prediction") is None:
            continue
        recorded.add(question)
        shown = predictions_of(a[key], b[key])
        if "prediction_a" in shown:
            differ.setdefault(question, {"id": question, **shown})
    return {"count": len(differ), "questions": len(recorded), "items": list(differ.values())}


def compare(a: dict, b: dict) -> dict:
    """Agreement of two judges' verdicts, per benchmark, criterion and (where known) question type."""
    common = sorted(set(a) & set(b))
    groups: dict[str, list] = defaultdict(list)
    for key in common:
        bench, _, crit = key
        groups[bench if crit == "qa" else f"{bench}/{crit}"].append(key)
        qtype = a[key].get("type") or b[key].get("type")
        if crit == "qa" and qtype is not None:
            groups[f"{bench}/type={qtype}"].append(key)
    out = {"items_a": len(a), "items_b": len(b), "common": len(common),
           "different_predictions": different_predictions(a, b, common), "groups": {}}
    for name, keys in sorted(groups.items()):
        sa = np.array([a[k]["score"] for k in keys], float)
        sb = np.array([b[k]["score"] for k in keys], float)
        res = {"n": len(keys), "mean_abs_score_difference": round(float(np.abs(sa - sb).mean()), 6),
               "score_a": round(float(sa.mean()), 6), "score_b": round(float(sb.mean()), 6),
               "score_difference_ci95": paired_difference_ci(sa, sb)}
        if keys[0][2] == "qa":
            pa, pb = [a[k]["pred"] for k in keys], [b[k]["pred"] for k in keys]
            ya, yb = np.array([p == "yes" for p in pa], float), np.array([p == "yes" for p in pb], float)
            res.update({"agreement": round(float((ya == yb).mean()), 6), "kappa": _round(cohen_kappa(pa, pb)),
                        "accuracy_a": round(float(ya.mean()), 6), "accuracy_b": round(float(yb.mean()), 6),
                        "accuracy_difference": round(float(yb.mean() - ya.mean()), 6),
                        "accuracy_difference_ci95": paired_difference_ci(ya, yb)})
            if "/type=" not in name:
                res["disagreements"] = [
                    {"id": k[1], "a": {"pred": a[k]["pred"], "score": a[k]["score"]},
                     "b": {"pred": b[k]["pred"], "score": b[k]["score"]},
                     **{f: a[k].get(f) or b[k].get(f) for f in ("question", "reference")}, **predictions_of(a[k], b[k])}
                    for k, x, y in zip(keys, pa, pb) if x != y]
        out["groups"][name] = res
    return out


def _round(x):
    return None if x is None else round(x, 6)


def report(result: dict, name_a: str, name_b: str) -> str:
    differ = result["different_predictions"]
    lines = [f"A = {name_a}", f"B = {name_b}",
             f"{result['common']} items graded by both (A: {result['items_a']}, B: {result['items_b']})"]
    if differ["count"]:
        lines.append(f"WARNING: A and B judged different predictions for {differ['count']} of {differ['questions']} "
                     "questions (listed below): the numbers compare the answers as well as the judges; to compare "
                     "the judges alone, let both judge the same run's predictions")
    lines += ["",
             f"{'group':<34} {'n':>5} {'agree':>6} {'kappa':>6} {'|dscore|':>8} {'acc A':>6} {'acc B':>6} "
             f"{'B-A [95% CI]':>22}"]
    for name, r in result["groups"].items():
        if "agreement" in r:
            ci = r["accuracy_difference_ci95"]
            diff = f"{100 * r['accuracy_difference']:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")
            kappa = "–" if r["kappa"] is None else f"{r['kappa']:.3f}"
            lines.append(f"{name:<34} {r['n']:>5} {r['agreement']:>6.3f} {kappa:>6} {r['mean_abs_score_difference']:>8.3f} "
                         f"{100 * r['accuracy_a']:>6.1f} {100 * r['accuracy_b']:>6.1f} {diff:>22}")
        else:
            ci = r["score_difference_ci95"]
            diff = f"{r['score_b'] - r['score_a']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
            lines.append(f"{name:<34} {r['n']:>5} {'':>6} {'':>6} {r['mean_abs_score_difference']:>8.3f} "
                         f"{r['score_a']:>6.2f} {r['score_b']:>6.2f} {diff:>22}")
    for name, r in result["groups"].items():
        for d in r.get("disagreements", [])[:20]:
            line = f"  {name} {d['id']}: A {d['a']['pred']}/{d['a']['score']}, B {d['b']['pred']}/{d['b']['score']}"
            if d.get("question"):
                line += f" | Q: {d['question']} | ref: {d['reference']}"
            if "prediction_a" in d:
                line += f" | pred A: {d['prediction_a']} | pred B: {d['prediction_b']}"
            elif d.get("question"):
                line += f" | pred: {d['prediction']}"
            lines.append(line)
    if differ["count"]:
        lines += ["", f"different predictions ({min(20, differ['count'])} of {differ['count']} shown):"]
        lines += [f"  {d['id']}: A: {d['prediction_a']} | B: {d['prediction_b']}" for d in differ["items"][:20]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m panda.evaluation.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="an evaluate.py run folder, or a release-format verdict file")
    p.add_argument("b", help="the same, judged by the other judge")
    p.add_argument("--benchmark", default=None, help="the benchmark a verdict file judged (e.g. msvd_qa)")
    p.add_argument("--json", default=None, help="also write the full comparison (with every disagreement) here")
    args = p.parse_args(argv)
    try:
        a, b = read_side(args.a, args.benchmark), read_side(args.b, args.benchmark)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = compare(a, b)
    if not result["common"]:
        print(f"error: no item is graded by both ({len(a)} in A, {len(b)} in B): are they the same predictions "
              "and benchmark names?", file=sys.stderr)
        return 2
    print(report(result, args.a, args.b))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
