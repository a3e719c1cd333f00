"""STAB + a per-kind reader on the synthetic benchmark (``stab_probe.py`` beside this file), composed
from the same Hydra configs as train.py: experiment=ablation/..., frames/..., stab.*, seed, ...

    python experiments/ablations_v2/probe.py experiment=ablation/no_lste seed=1 data.root=DIR trainer.max_steps=700
    python experiments/ablations_v2/probe.py ... +probe_kinds=[direction]   # one question kind only
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from stab_probe import run_probe  # this folder's module (the script's folder is on sys.path)

from panda.config import register_configs, to_train_config
from panda.paths import config_dir
from panda.runs import exit_on_config_error

register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    with open_dict(cfg):
        kinds = cfg.pop("probe_kinds", None)  # +probe_kinds=[direction]: train and score these kinds only
    try:
        run_cfg = to_train_config(cfg)
    except ValueError as exc:
        exit_on_config_error("probe.py", exc)
    return run_probe(run_cfg, HydraConfig.get().runtime.output_dir, list(kinds) if kinds else None)["eval/accuracy"]


if __name__ == "__main__":
    main()
