"""Train a Video-Panda-style model. ``python train.py`` runs the embedded synthetic default on CPU.

Examples::

    python train.py                                   # tiny STAB + tiny LLaMA on generated videos
    python train.py experiment=ablation/no_fsra       # one ablation
    python train.py --multirun experiment=ablation/no_fsra,ablation/no_gstra frames=4,8
    python train.py hydra.run.dir=outputs/x resume=last      # resume the run in outputs/x
"""

import sys

import hydra
from omegaconf import DictConfig

from panda import check_torchvision
from panda.config import TrainConfig, register_configs, to_train_config
from panda.errors import PandaError
from panda.overrides import check_command_line
from panda.plan import check_gpu_plan
from panda.runs import exit_on_config_error

check_torchvision()  # before Lightning is imported: a broken torchvision would take it down unexplained
from panda.training.run import train  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        run_cfg = to_train_config(cfg)
    except (ValueError, PandaError) as exc:  # names the key and the fix; no traceback, no empty run folder
        exit_on_config_error("train.py", exc)
    problem = check_gpu_plan(run_cfg)
    if problem:  # before any weight is read: the planner says this run cannot fit this GPU
        exit_on_config_error("train.py", ValueError(problem))
    try:
        summary = train(run_cfg)
    except PandaError as exc:  # data that cannot serve this config (e.g. a frame store made for other settings)
        exit_on_config_error("train.py", exc, kind="error")
    if summary.get("status") == "interrupted":
        sys.exit(130)  # stopped by Ctrl-C (the checkpoint is saved; the resume command was printed)
    return summary.get("eval/accuracy")


if __name__ == "__main__":
    check_command_line("train.py", TrainConfig, "train", sys.argv[1:])  # a misspelt group option or key: exit 2
    main()
