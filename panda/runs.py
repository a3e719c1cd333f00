"""Run bookkeeping shared by training and evaluation: where a run writes, which commit made it,
which experiment it composed, and a readable summary on the terminal."""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger(__name__)


def _git(*args: str) -> str | None:
    """``git ARGS`` run in panda's package folder: its output, or None (no git, or git failed)."""
    try:
        out = subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the panda checkout this runs from; None outside one: an installed wheel, no git, or a
    package folder that is not the top of the checkout it sits in (a wheel installed into a virtualenv
    inside some other repository, whose commit says nothing about panda)."""
    top = _git("rev-parse", "--show-toplevel")
    package = os.path.dirname(os.path.abspath(__file__))
    if not top or os.path.realpath(top) != os.path.realpath(os.path.dirname(package)):
        return None
    return _git("rev-parse", "HEAD") or None


def has_uncommitted_changes() -> bool:
    """Whether the panda checkout this runs from has uncommitted changes to tracked files."""
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def experiment_choice() -> str | None:
    """The ``experiment=`` config this run composed (None outside Hydra or without one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("experiment")
    except ValueError:
        return None


def hydra_overrides() -> list[str]:
    """The command-line overrides of this run (empty outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


# overrides that say where a run lives or how it logs, not what it trains: left out of its name
_NOT_IN_NAME = ("hydra.", "run_dir=", "runs_root=", "data.root=", "logger", "resume=", "experiment=",
                "trainer.enable_progress_bar=",
                "data.num_workers=", "data.eval_", "data.synthetic=")


def run_name(name: str) -> str:
    """A dashboard name that says what the run is: the experiment (or ``name`` when it is not the
    default) and the overrides that change what it trains, e.g. ``ablation/no_fsra frames=8 seed=2``."""
    base = experiment_choice() if name == "default" and experiment_choice() else name
    extra = [o for o in hydra_overrides() if not o.lstrip("+~").startswith(_NOT_IN_NAME)]
    return " ".join([base, *extra])[:128]


def run_dir_of(cfg, default: str = "outputs/run") -> str:
    """The run directory: Hydra's output dir under Hydra, else ``cfg.run_dir`` (or ``default``)."""
    return hydra_run_dir() or os.path.abspath(getattr(cfg, "run_dir", None) or default)


def resume_command(run_dir: str) -> str:
    """The ``train.py`` command line that continues the run in ``run_dir`` from its last checkpoint:
    this run's own overrides (under Hydra) with the run dir fixed and ``resume=last``."""
    import shlex

    keep = [o for o in hydra_overrides() if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir=", "run_dir="))]
    return " ".join(["python", "train.py", *map(shlex.quote, keep), shlex.quote(f"hydra.run.dir={run_dir}"), "resume=last"])


# what a run writes into its folder before it has anything to keep (no checkpoint, no summary.json)
_SCAFFOLDING = (".hydra", "tokenizer", "csv", "wandb", "samples", "heldout", "checkpoints", "rejects.jsonl")


def discard_run_dir(run_dir: str | None) -> bool:
    """Remove a run folder that holds nothing to keep: no checkpoint and no ``summary.json``, only
    what Hydra and panda write at start (``.hydra/``, the log, the tokenizer copy, empty logger
    folders). Anything else in it (a user's own file) keeps the folder. Empty parents up to the
    working directory (``outputs/<name>/``) go too. True when it was removed."""
    import shutil

    if not run_dir or not os.path.isdir(run_dir):
        return False
    checkpoints = os.path.join(run_dir, "checkpoints")
    if os.path.exists(os.path.join(run_dir, "summary.json")) or (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        return False
    if any(name not in _SCAFFOLDING and not name.endswith(".log") for name in os.listdir(run_dir)):
        return False
    shutil.rmtree(run_dir)
    parent, stop = os.path.dirname(os.path.abspath(run_dir)), os.path.abspath(os.getcwd())
    while parent.startswith(stop + os.sep) and not os.listdir(parent):
        os.rmdir(parent)
        parent = os.path.dirname(parent)
    return True


def hydra_run_dir() -> str | None:
    """The folder Hydra made for this job (None outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except ValueError:
        return None


def exit_on_config_error(entry: str, exc: Exception, kind: str = "config error") -> None:
    """A config that cannot run: one line on stderr, exit code 2, and no run folder left behind
    (Hydra makes it before the job starts; it goes again unless it holds a checkpoint or a summary)."""
    import sys

    logging.shutdown()  # close the job's log file before its folder goes
    discard_run_dir(hydra_run_dir())
    print(f"{entry}: {kind}: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


def wandb_offline(offline: bool | None, run_dir: str) -> bool:
    """``logger.offline``, where None means offline unless an API key is configured."""
    if offline is not None:
        return offline
    offline = not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc")))
    if offline:
        log.info("wandb: no API key configured; logging offline (upload later with `wandb sync %s/wandb`)", run_dir)
    return offline


def format_summary(summary: dict, title: str = "panda run summary") -> str:
    """One line per scalar; a list or a dict is shown by its size (the full value stays in the JSON)."""
    width = max((len(k) for k in summary), default=0)

    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, (list, tuple)):
            return f"[{len(value)} entries]"
        if isinstance(value, dict):
            return f"{{{len(value)} keys}}"
        return str(value)

    return f"\n== {title} ==\n" + "\n".join(f"  {k:<{width}}  {show(v)}" for k, v in summary.items())


def print_summary(summary: dict, title: str = "panda run summary") -> None:
    print(format_summary(summary, title), flush=True)
