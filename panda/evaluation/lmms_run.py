"""What an ``lmms-eval eval`` run left behind: its results and samples files, and the failures it reports
only in its log.

lmms-eval 0.7.3 catches an exception raised while it evaluates (a model that does not load, a task it
cannot find, a dependency that is missing or of the wrong version), prints the traceback and exits 0,
writing no results. :func:`check_lmms_run` makes that an error quoting the log's relevant lines::

    lmms-eval eval --model panda ... --output_path out --log_samples 2>&1 | tee lmms.log
    python -m panda.evaluation.lmms_run --log lmms.log --output_path out --tasks my_task

It reads files only (no lmms-eval import), so it checks a run made anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION = re.compile(r"^(\w+\.)*\w*(Error|Exception|Exit|Interrupt)\b(:|$)")  # ValueError: ..., a.b.SomeError
_ERROR_LEVEL = re.compile(r"\|\s*(ERROR|CRITICAL)\s*\|")  # loguru's level column
_MAX_LINES = 80


class LmmsEvalFailed(RuntimeError):
    """An lmms-eval run that failed, whatever its exit status: the message quotes what its log says."""


@dataclasses.dataclass
class LmmsRun:
    results: dict  # the run's results JSON (``results``: {task: {"metric,filter": value}}, ``config``, ...)
    samples: dict[str, list[dict]]  # per task: its ``--log_samples`` rows in ``doc_id`` order
    results_path: str


def failure_lines(log: str) -> list[str]:
    """The lines of an lmms-eval log that report a failure, colours removed: each traceback (its header,
    its indented frames and the exception line that ends it), each ERROR-level line and any other
    exception line (``ModuleNotFoundError: ...``)."""
    out, in_traceback = [], False
    for line in _ANSI.sub("", log).splitlines():
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
            out.append(line)
        elif in_traceback:
            out.append(line)
            in_traceback = line[:1].isspace() or not line.strip()  # a frame; the exception line ends it
        elif _ERROR_LEVEL.search(line) or _EXCEPTION.match(line.strip()):
            out.append(line)
    return out


def read_outputs(output_path: str, tasks: list[str]) -> LmmsRun:
    """The newest results file under ``output_path`` and its samples file for each task (lmms-eval writes
    ``<output_path>/<model>/<time>_results.json`` and ``<time>_samples_<task>.jsonl``). Raises
    :class:`LmmsEvalFailed` naming what is missing."""
    found = sorted(glob.glob(os.path.join(glob.escape(output_path), "**", "*_results.json"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise LmmsEvalFailed(f"no *_results.json under {output_path}: lmms-eval wrote no results")
    path = found[-1]
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    prefix = path[: -len("_results.json")]
    samples, missing = {}, []
    for task in tasks:
        if task not in results.get("results", {}):
            missing.append(f"task {task} is not in {path} (it has {sorted(results.get('results', {}))})")
        sample_path = f"{prefix}_samples_{task}.jsonl"
        if not os.path.exists(sample_path):
            missing.append(f"no samples file {sample_path} (run lmms-eval with --log_samples)")
            continue
        with open(sample_path, encoding="utf-8") as f:
            samples[task] = sorted((json.loads(line) for line in f if line.strip()), key=lambda row: row["doc_id"])
    if missing:
        raise LmmsEvalFailed("lmms-eval's outputs are incomplete:\n  " + "\n  ".join(missing))
    return LmmsRun(results, samples, path)


def check_lmms_run(log: str, output_path: str, tasks: list[str], docs: dict[str, int] | None = None) -> LmmsRun:
    """The outputs of a finished ``lmms-eval eval ... --output_path OUTPUT_PATH --log_samples`` run whose
    console output is ``log``; :class:`LmmsEvalFailed` when the log reports a failure (:func:`failure_lines`,
    quoted), when a task has no results or samples, or when a task of ``docs`` ({task: documents}) has
    another number of samples."""
    lines = failure_lines(log)
    if lines:
        shown = lines if len(lines) <= _MAX_LINES else ["..."] + lines[-_MAX_LINES:]
        raise LmmsEvalFailed("lmms-eval reported a failure (its exit status says nothing: 0.7.3 exits 0 after "
                             "an exception):\n" + "\n".join(shown))
    run = read_outputs(output_path, tasks)
    wrong = [f"{task}: {len(run.samples[task])} samples, {n} documents" for task, n in (docs or {}).items()
             if len(run.samples.get(task, [])) != n]
    if wrong:
        raise LmmsEvalFailed("lmms-eval answered only part of a task:\n  " + "\n  ".join(wrong))
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m panda.evaluation.lmms_run",
                                     description="Check a finished lmms-eval run: its log and its output files.")
    parser.add_argument("--log", required=True, help="the run's console output (stdout and stderr)")
    parser.add_argument("--output_path", required=True, help="the run's --output_path")
    parser.add_argument("--tasks", required=True, help="the run's --tasks (comma-separated task names)")
    args = parser.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as f:
        log = f.read()
    tasks = [t for t in args.tasks.split(",") if t]
    try:
        run = check_lmms_run(log, args.output_path, tasks)
    except LmmsEvalFailed as e:
        print(f"lmms_run: {e}", file=sys.stderr)
        return 1
    for task in tasks:
        print(f"{task}: {len(run.samples[task])} samples, {json.dumps(run.results['results'][task])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
