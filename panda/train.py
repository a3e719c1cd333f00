"""Train a model: ``panda train`` (``python train.py`` in a checkout, ``python -m panda.train``), the
Hydra overrides after it. With none it runs the embedded synthetic default on CPU.

Examples::

    panda train                                   # tiny STAB + tiny LLaMA on generated videos
    panda train experiment=ablation/no_fsra       # one ablation
    panda train --multirun experiment=ablation/no_fsra,ablation/no_gstra frames=4,8
    panda train hydra.run.dir=outputs/x resume=last      # resume the run in outputs/x
    panda train --config-dir my_conf experiment=mine     # a config folder of your own on top of panda's
"""

import sys

from omegaconf import DictConfig

from panda import check_torchvision
from panda.config import TrainConfig, register_configs, to_train_config
from panda.errors import PandaError
from panda.overrides import run_hydra_app
from panda.plan import check_gpu_plan
from panda.runs import exit_on_config_error

check_torchvision()  # before Lightning is imported: a broken torchvision would take it down unexplained
from panda.training.run import train  # noqa: E402

register_configs()

PROG = "python -m panda.train"  # how this process was started: the first word of its messages (main sets it)


def task(cfg: DictConfig) -> float | None:
    """One run of the composed config (Hydra calls it once per run, per point of a ``--multirun``)."""
    try:
        run_cfg = to_train_config(cfg)
    except (ValueError, PandaError) as exc:  # names the key and the fix; no traceback, no empty run folder
        exit_on_config_error(PROG, exc)
    problem = check_gpu_plan(run_cfg)
    if problem:  # before any weight is read: the planner says this run cannot fit this GPU
        exit_on_config_error(PROG, ValueError(problem))
    try:
        summary = train(run_cfg)
    except PandaError as exc:  # data that cannot serve this config (e.g. a frame store made for other settings)
        exit_on_config_error(PROG, exc, kind="error")
    if summary.get("status") == "interrupted":
        sys.exit(130)  # stopped by Ctrl-C (the checkpoint is saved; the resume command was printed)
    return summary.get("eval/accuracy")


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    """``panda train``: the overrides checked, then Hydra on panda's configs (:func:`run_hydra_app`)."""
    global PROG
    PROG = prog
    run_hydra_app(prog, TrainConfig, "train", task, argv)


if __name__ == "__main__":
    main()
