"""Evaluate a checkpoint on one or more benchmarks: generate, judge, tabulate. ``panda evaluate``
(``python evaluate.py`` in a checkout, ``python -m panda.evaluate``), the Hydra overrides after it.

    panda evaluate checkpoint=outputs/default/<date>/checkpoints/last.ckpt        # the synthetic split
    panda evaluate checkpoint=/models/Video-Panda-7B benchmark=[msvd_qa,vcgbench] \\
        benchmark.msvd_qa.root=/data/eval benchmark.vcgbench.root=/data/eval judge=openai
    torchrun --nproc_per_node=4 -m panda.evaluate ...                               # sharded generation
"""

import sys

from omegaconf import DictConfig

from panda import check_torchvision
from panda.config import EvaluateConfig, register_configs, to_evaluate_config
from panda.errors import PandaError
from panda.overrides import run_hydra_app
from panda.runs import exit_on_config_error

check_torchvision()  # before Lightning is imported: a broken torchvision would take it down unexplained
from panda.evaluation.run import evaluate, nothing_judged, shortfall  # noqa: E402

register_configs()

PROG = "python -m panda.evaluate"  # how this process was started: the first word of its messages (main sets it)


def task(cfg: DictConfig) -> None:
    """One evaluation of the composed config (Hydra calls it once per run, per point of a ``--multirun``)."""
    try:
        eval_cfg = to_evaluate_config(cfg)
    except ValueError as exc:
        exit_on_config_error(PROG, exc)
    try:
        results = evaluate(eval_cfg)
    except PandaError as exc:  # e.g. the judge server does not serve judge.model: one line, not a traceback
        exit_on_config_error(PROG, exc, kind="error")
    empty = nothing_judged(results)
    if empty:  # a benchmark without one judged answer has no number: say why and fail
        for name in empty:
            print(f"{PROG}: {shortfall(name, results['benchmarks'][name]) or f'`{name}`: nothing judged'}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    """``panda evaluate``: the overrides checked, then Hydra on panda's configs (:func:`run_hydra_app`)."""
    global PROG
    PROG = prog
    run_hydra_app(prog, EvaluateConfig, "evaluate", task, argv)


if __name__ == "__main__":
    main()
