"""Evaluate a trained checkpoint on held-out open-ended QA (normalised exact match).

    python evaluate.py checkpoint=outputs/default/<date>/checkpoints/last.ckpt
"""

import hydra
from omegaconf import DictConfig

from panda.config import register_configs
from panda.evaluation.run import evaluate

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["eval/accuracy"]


if __name__ == "__main__":
    main()
