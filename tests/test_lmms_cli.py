"""lmms-eval's own command line runs panda: ``lmms-eval eval --model panda`` on a local task YAML (a JSON
lines file of generated videos and questions, offline) answers every question exactly as ``evaluate.py``
does for the same checkpoint, videos and questions. lmms-eval exits 0 after a failure inside it, so its
log and its output files are what say whether it ran (panda.evaluation.lmms_run)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SUBPROCESS_TIMEOUT, make_video_file, train_tiny

from panda.evaluation.lmms_run import LmmsEvalFailed, check_lmms_run, failure_lines

TASK = "panda_tiny_video_qa"

# a task of lmms-eval's own YAML kind: Hugging Face datasets' "json" builder reads the local file (nothing
# is downloaded), each row's video path is the visual, its question the prompt, its answer the target
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: video
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def lmms_eval_env(tmp_path) -> dict:
    """The environment of an ``lmms-eval`` subprocess: this interpreter's bin folder first on PATH (the
    .venv's ``lmms-eval``), Hugging Face offline with its caches under ``tmp_path``, one thread."""
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "disabled"}


def start_lmms_eval(tmp_path, checkpoint, task_dir, output_path) -> subprocess.Popen:
    """``lmms-eval eval --model panda ...`` as the user types it, stdout and stderr together."""
    env = lmms_eval_env(tmp_path)
    command = shutil.which("lmms-eval", path=env["PATH"])
    assert command, f"no lmms-eval on PATH ({env['PATH']}): bash install.sh installs it"
    args = [command, "eval", "--model", "panda", "--model_args", f"pretrained={checkpoint},device=cpu",
            "--include_path", str(task_dir), "--tasks", TASK, "--output_path", str(output_path), "--log_samples"]
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def write_task(tmp_path, docs: list[dict]):
    """The task folder: the YAML and its JSON lines file."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, docs=task_dir / "docs.jsonl"))
    return task_dir


@pytest.fixture(scope="module")
def trained_checkpoint(synthetic_root, tmp_path_factory) -> str:
    # trained long enough to answer with words (a 2-step model answers with nothing)
    run_dir = tmp_path_factory.mktemp("lmms_cli_run")
    return train_tiny(synthetic_root, run_dir, "trainer.max_steps=200", "evaluate=false")["checkpoint"]


def qa_folder(synthetic_root, folder) -> list[dict]:
    """A QA benchmark folder of evaluate.py's layout (``videos/``, ``test_q.json``, ``test_a.json``): the
    synthetic held-out videos and questions plus two clips written here with PyAV (other sizes and
    lengths, asked two of the same questions); returns its rows as the lmms-eval task's documents."""
    source = os.path.join(synthetic_root, "eval", "Synthetic_Zero_Shot_QA")
    shutil.copytree(os.path.join(source, "videos"), folder / "videos")
    questions = json.load(open(os.path.join(source, "test_q.json")))
    answers = json.load(open(os.path.join(source, "test_a.json")))
    colour = next(q["question"] for q in questions if q["question_id"].endswith("_colour"))
    direction = next(q["question"] for q in questions if q["question_id"].endswith("_direction"))
    for name, (width, height, frames) in {"pyav_a": (96, 72, 12), "pyav_b": (64, 48, 20)}.items():
        make_video_file(str(folder / "videos" / f"{name}.mp4"), width, height, frames, seed=len(name) + frames)
        for kind, question, answer in (("colour", colour, "red"), ("direction", direction, "right")):  # its clip
            questions.append({"video_name": name, "question": question, "question_id": f"{name}_{kind}"})
            answers.append({"answer": answer, "type": None, "question_id": f"{name}_{kind}"})
    (folder / "test_q.json").write_text(json.dumps(questions))
    (folder / "test_a.json").write_text(json.dumps(answers))
    answer_of = {a["question_id"]: a["answer"] for a in answers}
    return [{"id": q["question_id"], "video": str(folder / "videos" / f"{q['video_name']}.mp4"),
             "question": q["question"], "answer": answer_of[q["question_id"]]} for q in questions]


@pytest.mark.slow
def test_lmms_eval_cli_answers_as_evaluate_py_does(synthetic_root, trained_checkpoint, tmp_path):
    docs = qa_folder(synthetic_root, tmp_path / "qa")
    task_dir = write_task(tmp_path, docs)

    # the two commands side by side (one thread each): lmms-eval's CLI and evaluate.py on the same questions
    lmms = start_lmms_eval(tmp_path, trained_checkpoint, task_dir, tmp_path / "lmms_out")
    evaluate_py = subprocess.Popen(
        [sys.executable, "evaluate.py", f"checkpoint={trained_checkpoint}", f"hydra.run.dir={tmp_path / 'eval'}",
         "num_workers=0", "batch_size=1", "max_new_tokens=6", "benchmark=[synthetic]",
         "benchmark.synthetic.from_checkpoint=false", f"benchmark.synthetic.root={tmp_path}", "benchmark.synthetic.qa_dir=qa"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = lmms.communicate(timeout=SUBPROCESS_TIMEOUT)
    evaluate_log, _ = evaluate_py.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert evaluate_py.returncode == 0, evaluate_log[-4000:]
    assert lmms.returncode == 0, log[-4000:]

    run = check_lmms_run(log, str(tmp_path / "lmms_out"), [TASK], docs={TASK: len(docs)})
    samples = run.samples[TASK]
    answers = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]
    assert [s["input"] for s in samples] == [d["question"] for d in docs]  # the prompt is the question, nothing added
    assert [s["target"] for s in samples] == [d["answer"] for d in docs]

    predictions = [json.loads(line) for line in (tmp_path / "eval" / "synthetic" / "predictions.jsonl").read_text().splitlines()]
    want = {p["uid"]: p["prediction"] for p in predictions}
    assert len(want) == len(docs) == 12
    assert answers == [want[d["id"]] for d in docs]
    assert all(answers)  # a checkpoint that answers with words
    # lmms-eval's score is of these answers
    exact = sum(a == d["answer"] for a, d in zip(answers, docs)) / len(docs)
    assert run.results["results"][TASK]["exact_match,none"] == pytest.approx(exact)


@pytest.mark.slow
def test_a_failure_inside_lmms_eval_fails_the_check_though_it_exits_0(tmp_path):
    """A checkpoint that is not there: lmms-eval prints the traceback, writes nothing and exits 0."""
    video = make_video_file(str(tmp_path / "clip.mp4"))
    task_dir = write_task(tmp_path, [{"id": "q0", "video": video, "question": "Which colour?", "answer": "red"}])
    missing = tmp_path / "no_such_run" / "last.ckpt"
    proc = start_lmms_eval(tmp_path, missing, task_dir, tmp_path / "lmms_out")
    log, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    with pytest.raises(LmmsEvalFailed) as failed:
        check_lmms_run(log, str(tmp_path / "lmms_out"), [TASK])
    message = str(failed.value)
    assert "Traceback (most recent call last)" in message and str(missing) in message, log[-4000:]
    assert "panda/evaluation/lmms.py" in message  # the frame where panda loads the checkpoint


def test_failure_lines_of_an_lmms_eval_log():
    """The lines :func:`check_lmms_run` quotes: tracebacks, ERROR-level lines, exception lines, colours
    removed; an INFO line that mentions an error is not one."""
    log = ("\x1b[32m2026-01-01 00:00:00\x1b[0m | \x1b[1mINFO    \x1b[0m | lmms_eval.__main__:cli_evaluate:516 - Verbosity set to INFO\n"
           "2026-01-01 00:00:01 | INFO     | lmms_eval.api.task:build:473 - error_rate is a metric here\n"
           "Traceback (most recent call last):\n"
           '  File "lmms_eval/evaluator.py", line 134, in _enable_reentrant_filelocks\n'
           "    import filelock._api as _fl_api\n"
           "ModuleNotFoundError: No module named 'filelock._api'\n"
           "\x1b[31m2026-01-01 00:00:02 | ERROR    | lmms_eval.__main__:cli_evaluate:614 - Error during evaluation: "
           "No module named 'filelock._api'.\x1b[0m\n"
           "|  Tasks   |Filter|n-shot|  Metric   |   |Value|\n")
    assert failure_lines(log) == [
        "Traceback (most recent call last):",
        '  File "lmms_eval/evaluator.py", line 134, in _enable_reentrant_filelocks',
        "    import filelock._api as _fl_api",
        "ModuleNotFoundError: No module named 'filelock._api'",
        "2026-01-01 00:00:02 | ERROR    | lmms_eval.__main__:cli_evaluate:614 - Error during evaluation: No module named 'filelock._api'."]
    with pytest.raises(LmmsEvalFailed, match=r"(?s)exits 0.*No module named 'filelock._api'"):
        check_lmms_run(log, "/nonexistent", [TASK])
    assert failure_lines(log.split("Traceback")[0]) == []
