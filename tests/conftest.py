import os

import numpy as np
import pytest
import torch

from panda.data.synthetic import SyntheticConfig, generate, render_clip, write_video
from panda.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO, "conf")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """A small generated dataset in the real on-disk layout (24 train videos, 4 eval videos)."""
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    return generate(SyntheticConfig(root=root, train_videos=24, eval_videos=4))


@pytest.fixture(scope="session")
def tokenizer(synthetic_root):
    return load_tokenizer(os.path.join(synthetic_root, "tokenizer"))


@pytest.fixture
def make_video(tmp_path):
    """Write a clip with PyAV: make_video(name, width, height, frames, codec) -> path."""

    def _make(name="clip.mp4", width=64, height=48, frames=8, codec="libx264", fps=8, seed=0):
        rng = np.random.default_rng(seed)
        arr = render_clip("red", "circle", "right", width, height, frames, rng)
        path = str(tmp_path / name)
        write_video(path, arr, fps=fps, codec=codec)
        return path

    return _make


def compose(overrides=(), config_name="train"):
    """Compose the real conf/ files the way train.py does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from panda.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


def tiny_overrides(root: str, run_dir: str) -> list[str]:
    """Overrides that point a run at the session's small dataset and keep it short."""
    return [
        f"data.root={root}",
        "data.synthetic=null",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.eval_limit=6",
        "llm.hidden_size=32",
        "llm.intermediate_size=64",
        "stab.width=32",
        "trainer.enable_progress_bar=false",
        "logger.kind=none",
        f"+run_dir={run_dir}",
    ]
