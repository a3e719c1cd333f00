"""panda as a dependency: the wheel, installed in a fresh virtual environment, runs from a folder
outside the checkout with panda's configs from the wheel and a user's config folder on top.

The fresh environment gets panda's dependencies without installing them again: a ``.pth`` file puts
this environment's site-packages on its path. ``.pth`` files inside that folder are not read, so the
editable panda of this checkout is not importable there until the wheel is installed."""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import yaml

from conftest import REPO, SUBPROCESS_TIMEOUT

pytestmark = pytest.mark.slow

# a user's own config folder: an experiment and a data config of theirs, composed on panda's
USER_CONF = {
    "experiment/mine.yaml": """\
# @package _global_
name: mine
llm:
  hidden_size: 32
  intermediate_size: 64
stab:
  width: 32
trainer:
  max_steps: 2
  enable_progress_bar: false
""",
    "data/tiny.yaml": """\
# @package _global_
defaults:
  - synthetic  # panda's data/synthetic.yaml, made small
data:
  root: data_cache/tiny
  synthetic:
    train_videos: 8
    eval_videos: 4
  num_workers: 0
  batch_size: 4
  eval_batch_size: 4
  eval_limit: 4
""",
}


def run(args, cwd, check=True) -> subprocess.CompletedProcess:
    """A command of the fresh environment, with nothing of the checkout on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    if check:
        assert proc.returncode == 0, (args, proc.stdout[-3000:] + proc.stderr[-4000:])
    return proc


def checkout_files() -> set[str]:
    """What the wheel must carry, as its paths: every module of panda/ and every file of conf/."""
    found = set()
    for folder, prefix in (("panda", "panda"), ("conf", "panda/conf")):
        root = os.path.join(REPO, folder)
        for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
            if os.path.isfile(path) and path.endswith((".py", ".yaml")) and "__pycache__" not in path:
                found.add(f"{prefix}/{os.path.relpath(path, root).replace(os.sep, '/')}")
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the fresh environment's bin folder, a working folder outside the checkout that
    holds only the user's config folder, my_conf)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside pyproject.toml
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("panda", "conf"):
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    # with this environment's setuptools when it has one (offline, seconds); else pip fetches the build backend
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--quiet", "-w", tmp / "dist", source], cwd=tmp)
    (wheel,) = glob.glob(str(tmp / "dist" / "panda-*.whl"))

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "panda_dependencies.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")
    work = tmp / "work"
    for name, text in USER_CONF.items():
        os.makedirs(work / "my_conf" / os.path.dirname(name), exist_ok=True)
        (work / "my_conf" / name).write_text(text)
    before = run([python, "-c", "import torch, lightning, hydra; import panda"], cwd=work, check=False)
    assert before.returncode != 0 and "No module named 'panda'" in before.stderr, before.stderr[-2000:]

    # --ignore-installed: pip must not touch the editable panda it sees through the .pth file
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--ignore-installed", wheel],
        cwd=tmp)
    return wheel, venv / "bin", work


def test_the_wheel_carries_every_module_and_config(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(checkout_files() - names)
    assert not missing, f"not in the wheel (pyproject.toml [tool.setuptools] packages / package-data): {missing}"
    assert {"panda/" + path for path in ("conf/train.yaml", "conf/experiment/ablation/no_fsra.yaml")} <= names
    entry_points = zipfile.ZipFile(wheel).read("panda-0.1.0.dist-info/entry_points.txt").decode()
    assert "panda = panda.cli:main" in entry_points


def test_panda_comes_from_the_environment_and_answers_help(installed):
    _, bin_dir, work = installed
    where = run([bin_dir / "python", "-c", "import panda, panda.paths; print(panda.__file__); print(panda.paths.config_dir())"],
                cwd=work).stdout.split()
    venv = str(bin_dir.parent)
    assert all(p.startswith(venv + os.sep) for p in where), where
    assert where[1].endswith(os.path.join("panda", "conf")) and os.path.isfile(os.path.join(where[1], "train.yaml"))
    out = run([bin_dir / "panda", "--help"], cwd=work).stdout
    assert all(f"  {name} " in out for name in ("train", "evaluate", "plan", "chat", "prepare", "export", "collect")), out
    proc = run([bin_dir / "panda", "trian"], cwd=work, check=False)
    assert proc.returncode == 2 and "did you mean `panda train`?" in proc.stderr, proc.stderr


def test_panda_train_with_a_config_folder_of_ones_own(installed):
    """``panda train --config-dir my_conf experiment=mine data=tiny``: the user's files compose on
    panda's (from the wheel), the run writes under the working folder, and a misspelt option of the
    user's folder is refused as panda's are."""
    _, bin_dir, work = installed
    proc = run([bin_dir / "panda", "train", "--config-dir", "my_conf", "experiment=mien", "data=tiny"], cwd=work, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("panda train: config error: experiment=mien: ") \
        and "did you mean experiment=mine?" in proc.stderr, proc.stderr
    assert not (work / "outputs").exists()

    run([bin_dir / "panda", "train", "--config-dir", "my_conf", "experiment=mine", "data=tiny"], cwd=work)
    (run_dir,) = (work / "outputs" / "mine").iterdir()
    for name in ("summary.json", "train.log", "checkpoints/last.ckpt", ".hydra/config.yaml"):
        assert (run_dir / name).exists(), name
    assert (work / "data_cache" / "tiny").is_dir()
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["llm"]["hidden_size"] == 32 and config["data"]["synthetic"]["train_videos"] == 8
    assert config["trainer"]["max_steps"] == 2
    sources = {s["provider"]: s["path"] for s in yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())
               ["hydra"]["runtime"]["config_sources"]}
    assert sources["main"].startswith(str(bin_dir.parent)) and sources["command-line"] == str(work / "my_conf")


def test_panda_plan_with_a_config_folder_of_ones_own(installed):
    _, bin_dir, work = installed
    out = run([bin_dir / "panda", "plan", "--config-dir", "my_conf", "experiment=mine", "data=tiny", "gpu=cpu"], cwd=work).stdout
    assert out.startswith("plan: single on 1 x CPU") and "memory per rank" in out, out
