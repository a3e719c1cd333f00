"""Evaluate a checkpoint on one or more benchmarks: generate, judge, tabulate. ``panda evaluate``
(``python evaluate.py`` in a checkout, ``python -m panda.evaluate``), the Hydra overrides after it.

    panda evaluate checkpoint=outputs/default/<date>/checkpoints/last.ckpt        # the synthetic split
    panda evaluate checkpoint=/models/Video-Panda-7B benchmark=[msvd_qa,vcgbench] \\
        benchmark.msvd_qa.root=/data/eval benchmark.vcgbench.root=/data/eval judge=openai
    torchrun --nproc_per_node=4 -m panda.evaluate ...                               # sharded generation
"""

import sys

import hydra
from omegaconf import DictConfig

from panda import check_torchvision
from panda.config import EvaluateConfig, register_configs, to_evaluate_config
from panda.errors import PandaError
from panda.overrides import check_command_line
from panda.paths import config_dir
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
    """Check the command line's overrides (a misspelt option or key: exit 2 before Hydra makes a run
    folder), then run Hydra on panda's config folder with ``argv`` as its command line."""
    global PROG
    PROG = prog
    argv = sys.argv[1:] if argv is None else list(argv)
    check_command_line(prog, EvaluateConfig, "evaluate", argv)
    sys.argv = [sys.argv[0], *argv]  # Hydra reads its command line there
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")(task)()


if __name__ == "__main__":
    main()
