"""``python -m panda.evaluation.agreement``: two judges' verdicts on the same
predictions, compared with numbers computed by hand."""

import json
import math
import os
import subprocess
import sys

from panda.evaluation.agreement import cohen_kappa, compare, read_release_file, read_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ten questions: A says yes to 0-5, B to 0-4 and 6; scores differ by 1 on four items
A_PRED = ["yes"] * 6 + ["no"] * 4
B_PRED = ["yes"] * 5 + ["no", "yes"] + ["no"] * 3
A_SCORE = [5, 5, 4, 4, 3, 3, 1, 1, 0, 0]
B_SCORE = [5, 4, 4, 3, 3, 2, 2, 1, 0, 0]
TYPES = ["what"] * 5 + ["how"] * 5


def _write_run(folder, preds, scores, extra=(), answers=None):
    """A run folder whose judge gave ``preds`` / ``scores`` to ``answers`` (default ``answer <i>``)."""
    answers = answers or [f"answer {i}" for i in range(len(preds))]
    os.makedirs(folder / "msvd_qa")
    with open(folder / "msvd_qa" / "judgements.jsonl", "w") as f:
        for i, (p, s) in enumerate(zip(preds, scores)):
            f.write(json.dumps({"id": f"q{i}", "criterion": "qa", "ok": True, "pred": p, "score": s, "type": TYPES[i],
                                "question": f"question {i}?", "reference": "ref", "prediction": answers[i]}) + "\n")
        for line in extra:
            f.write(json.dumps(line) + "\n")
    (folder / "results.json").write_text("{}")
    return str(folder)


def test_agreement_numbers_equal_the_hand_computed_ones(tmp_path):
    a = read_run(_write_run(tmp_path / "a", A_PRED, A_SCORE, [
        {"id": "q10", "criterion": "qa", "ok": False, "pred": None, "score": None, "reason": "unparseable"}]))
    b = read_run(_write_run(tmp_path / "b", B_PRED, B_SCORE))
    result = compare(a, b)
    assert result["common"] == 10 and result["items_a"] == 10  # a judge failure is no verdict
    r = result["groups"]["msvd_qa"]
    # contingency: both yes 5, A yes/B no 1, A no/B yes 1, both no 3 -> agreement 0.8;
    # chance agreement 0.6 * 0.6 + 0.4 * 0.4 = 0.52 -> kappa (0.8 - 0.52) / 0.48
    assert r["agreement"] == 0.8 and math.isclose(r["kappa"], 0.28 / 0.48, abs_tol=1e-6)
    assert math.isclose(r["mean_abs_score_difference"], 4 / 10) and r["accuracy_a"] == 0.6 and r["accuracy_b"] == 0.6
    assert r["accuracy_difference"] == 0.0 and r["accuracy_difference_ci95"][0] < 0 < r["accuracy_difference_ci95"][1]
    assert [d["id"] for d in r["disagreements"]] == ["q5", "q6"]
    assert r["disagreements"][0]["question"] == "question 5?" and r["disagreements"][0]["a"] == {"pred": "yes", "score": 3}
    what, how = result["groups"]["msvd_qa/type=what"], result["groups"]["msvd_qa/type=how"]
    assert what["n"] == how["n"] == 5 and what["agreement"] == 1.0 and how["agreement"] == 0.6
    assert cohen_kappa(["yes", "no"], ["yes", "no"]) == 1.0 and cohen_kappa(["yes"] * 3, ["yes"] * 3) == 1.0


def test_a_release_format_verdict_file_against_a_run_from_the_command_line(tmp_path):
    run = _write_run(tmp_path / "run", A_PRED, A_SCORE)
    release = {f"q{i}": [{"pred": p, "score": s}, {"q": f"question {i}?", "a": "ref", "pred": f"answer {i}"}]
               for i, (p, s) in enumerate(zip(B_PRED, B_SCORE))}
    release["q99"] = [{"pred": "maybe", "score": 3}, {}]  # an unparseable reply the release kept: not a verdict
    path = tmp_path / "gpt35_msvd.json"
    path.write_text(json.dumps(release))
    assert len(read_release_file(str(path), "msvd_qa")) == 10
    out = tmp_path / "agreement.json"
    proc = subprocess.run([sys.executable, "-m", "panda.evaluation.agreement", run, str(path), "--benchmark", "msvd_qa",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "msvd_qa" in proc.stdout and "0.800" in proc.stdout and "0.583" in proc.stdout
    assert json.loads(out.read_text())["groups"]["msvd_qa"]["kappa"] == round(0.28 / 0.48, 6)
    bad = subprocess.run([sys.executable, "-m", "panda.evaluation.agreement", run, str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--benchmark" in bad.stderr


def test_runs_that_judged_different_predictions_say_so_and_show_both(tmp_path):
    """Two judges compared on different answers measure the answers too: the comparison counts the
    questions whose predictions differ and shows both predictions wherever they differ."""
    answers = [f"answer {i}" for i in range(10)]
    answers[5], answers[8] = "a longer answer 5", "another answer 8"  # q5: the verdicts differ too; q8: they agree
    a = _write_run(tmp_path / "a", A_PRED, A_SCORE)
    b = _write_run(tmp_path / "b", B_PRED, B_SCORE, answers=answers)
    result = compare(read_run(a), read_run(b))
    differ = result["different_predictions"]
    assert (differ["count"], differ["questions"]) == (2, 10) and [d["id"] for d in differ["items"]] == ["msvd_qa/q5", "msvd_qa/q8"]
    assert differ["items"][1] == {"id": "msvd_qa/q8", "prediction_a": "answer 8", "prediction_b": "another answer 8"}
    q5, q6 = result["groups"]["msvd_qa"]["disagreements"]
    assert (q5["prediction_a"], q5["prediction_b"]) == ("answer 5", "a longer answer 5") and "prediction" not in q5
    assert q6["prediction"] == "answer 6" and "prediction_a" not in q6  # the same answer: shown once
    proc = subprocess.run([sys.executable, "-m", "panda.evaluation.agreement", a, b], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "different predictions for 2 of 10 questions" in proc.stdout
    assert "A: answer 8 | B: another answer 8" in proc.stdout  # listed although both judges said no
    assert "pred A: answer 5 | pred B: a longer answer 5" in proc.stdout
    same = compare(read_run(a), read_run(a))
    assert same["different_predictions"] == {"count": 0, "questions": 10, "items": []}
