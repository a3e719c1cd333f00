import os
import subprocess
import sys

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
    return generate(SyntheticConfig(train_videos=24, eval_videos=4), root)


@pytest.fixture(scope="session")
def tokenizer(synthetic_root):
    return load_tokenizer(os.path.join(synthetic_root, "tokenizer"))


def make_video_file(path, width=64, height=48, frames=8, codec="libx264", fps=8, seed=0):
    """Write a real clip with PyAV (a moving coloured shape) to ``path``."""
    rng = np.random.default_rng(seed)
    write_video(path, render_clip("red", "circle", "right", width, height, frames, rng), fps=fps, codec=codec)
    return path


@pytest.fixture
def make_video(tmp_path):
    """Write a clip with PyAV: make_video(name, width, height, frames, codec) -> path."""

    def _make(name="clip.mp4", width=64, height=48, frames=8, codec="libx264", fps=8, seed=0):
        return make_video_file(str(tmp_path / name), width, height, frames, codec, fps, seed)

    return _make


def compose(overrides=(), config_name="train"):
    """Compose the real conf/ files the way train.py does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from panda.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


def tiny_overrides(root: str, run_dir: str | None = None) -> list[str]:
    """Overrides that point a run at the session's small dataset and keep it short. ``run_dir``:
    where an in-process ``train()`` writes (a subprocess gets ``hydra.run.dir`` instead)."""
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
        "logger=none",
    ] + ([f"run_dir={run_dir}"] if run_dir is not None else [])


def train_tiny(root: str, run_dir, *extra: str) -> dict:
    """An in-process ``train()`` of the tiny model on ``root``, writing to ``run_dir``: its summary."""
    from panda.training.run import train

    return train(compose(tiny_overrides(root, str(run_dir)) + list(extra)))


# subprocess limits stay below pytest's per-test timeout (pyproject.toml), so a slow machine reports
# the slow command with its output instead of the test being killed
SUBPROCESS_TIMEOUT = 480


def run_cli(args, timeout: int = SUBPROCESS_TIMEOUT, check: bool = True, env: dict | None = None, cwd=REPO):
    """Run ``python ARGS...`` (``train.py``, ``evaluate.py``, ``-m panda.chat``), in the repository root
    unless ``cwd`` says otherwise, one thread per process; with ``check`` fail showing the end of its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def run_clis(arg_lists, cwd=REPO, env: dict | None = None, timeout: int = SUBPROCESS_TIMEOUT) -> list:
    """Run several ``python ARGS...`` at once (commands that refuse before training: most of their time is
    the interpreter's start), one thread each; their CompletedProcesses, in order, unchecked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    procs = [subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args in arg_lists]
    done = []
    for args, proc in zip(arg_lists, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess([sys.executable, *args], proc.returncode, stdout, stderr))
    return done


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_root, tmp_path_factory) -> str:
    """One trained tiny checkpoint (2 steps) for the evaluation, export and chat tests."""
    run_dir = tmp_path_factory.mktemp("ckpt_run")
    return train_tiny(synthetic_root, run_dir, "trainer.max_steps=2", "evaluate=false")["checkpoint"]


def tiny_video_lm(tokenizer, teacher_width=None, seed=0, layers=2, stab_width=32):
    """A tiny VideoLanguageModel (tiny STAB, 2-layer LLaMA, optional distillation head)."""
    from panda.models.distill import DistillConfig
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.manual_seed(seed)
    llm = build_llm(tokenizer, hidden_size=32, layers=layers, heads=4, intermediate_size=64)
    stab = STABConfig(width=stab_width, heads=4, resolution=112, dropout=0.0)
    distill = DistillConfig(layer_stride=1, heads=4) if teacher_width else None
    return VideoLanguageModel(stab, llm, distill=distill, teacher_width=teacher_width).eval()


def write_release_folder(model, folder, tokenizer=None, flavour="release", shards=2, fmt="safetensors",
                         model_type="videopanda_llama", extra=None, drop=()):
    """Write ``model`` the way the Video-Panda release (or EVE) stores it: one LLaMA-style folder,
    every tensor under the release's key names, sharded with an index. Built here from the key
    table, independently of panda's exporter."""
    import json

    from panda.models.checkpoints import RELEASE_HEAD_PREFIX, panda_to_release

    os.makedirs(folder, exist_ok=True)
    state = dict(model.llm.state_dict())
    vision = panda_to_release(model.stab, model.projector)
    if model.distill_head is not None:
        vision.update({RELEASE_HEAD_PREFIX + k: v for k, v in model.distill_head.state_dict().items()})
    if flavour == "eve":  # EVE has the shared parts only, under its own prefixes
        shared = ("patch_embedding.", "class_embedding", "split_embedding", "local_attention.", "global_attention.")
        eve = {}
        for k, v in vision.items():
            if k.startswith("model.video_tower."):
                inner = k[len("model.video_tower."):]
                if inner.startswith(shared):
                    eve["model.vision_tower." + inner] = v
            elif k.startswith("model.video_projector."):
                eve["model.mm_projector." + k[len("model.video_projector."):]] = v
            else:
                eve["model.vision_tower_compressor." + k[len(RELEASE_HEAD_PREFIX):]] = v
        vision = eve
    state.update(vision)
    state.update(extra or {})
    for key in drop:
        state.pop(key)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if fmt == "safetensors" else f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    with open(os.path.join(folder, index), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = model.llm.config.to_dict()
    config.update(model_type=model_type, architectures=["VideoPandaLlamaForCausalLM"], mm_video_tower="LanguageBind")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
