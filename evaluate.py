"""Evaluate a checkpoint on one or more benchmarks: generate, judge, tabulate.

    python evaluate.py checkpoint=outputs/default/<date>/checkpoints/last.ckpt        # the synthetic split
    python evaluate.py checkpoint=/models/Video-Panda-7B benchmark=[msvd_qa,vcgbench] \\
        benchmark.msvd_qa.root=/data/eval benchmark.vcgbench.root=/data/eval judge=openai
    torchrun --nproc_per_node=4 evaluate.py ...                                        # sharded generation
"""

import sys

import hydra
from omegaconf import DictConfig

from panda import check_torchvision
from panda.config import EvaluateConfig, register_configs, to_evaluate_config
from panda.errors import PandaError
from panda.overrides import check_command_line
from panda.runs import exit_on_config_error

check_torchvision()  # before Lightning is imported: a broken torchvision would take it down unexplained
from panda.evaluation.run import evaluate, nothing_judged, shortfall  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        eval_cfg = to_evaluate_config(cfg)
    except ValueError as exc:
        exit_on_config_error("evaluate.py", exc)
    try:
        results = evaluate(eval_cfg)
    except PandaError as exc:  # e.g. the judge server does not serve judge.model: one line, not a traceback
        exit_on_config_error("evaluate.py", exc, kind="error")
    empty = nothing_judged(results)
    if empty:  # a benchmark without one judged answer has no number: say why and fail
        for name in empty:
            print(f"evaluate.py: {shortfall(name, results['benchmarks'][name]) or f'`{name}`: nothing judged'}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    check_command_line("evaluate.py", EvaluateConfig, "evaluate", sys.argv[1:])  # a misspelt option or key: exit 2
    main()
