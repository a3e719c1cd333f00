"""Importing panda changes nothing in the process: no warning or logging filter, no torch setting,
no torchvision import. What a run needs (Lightning's noise kept off the console, a broken
torchvision explained) happens where the run starts, for as long as it lasts."""

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
from conftest import REPO

# the modules that used to set process-wide state on import, and the one that starts a run
PANDA = ["panda", "panda.training.trainer", "panda.models.compiled", "panda.training.run"]

# Every third-party module these imports load is imported first, so that what the dependencies do on
# their own import is in the "before" state; what differs after importing the panda modules is panda's.
STATE_AFTER_IMPORT = """
import importlib, json, logging, sys, warnings
import torch
import torch.fx.experimental._config as fx_config

for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception:  # a submodule that does not import on its own: whoever imported it will again
        pass


def state():
    loggers = {name: [type(f).__qualname__ for f in logger.filters]
               for name, logger in logging.root.manager.loggerDict.items() if getattr(logger, "filters", None)}
    return {"warning filters": [repr(f) for f in warnings.filters], "logging filters": loggers,
            "root logger filters": [type(f).__qualname__ for f in logging.getLogger().filters],
            "torch.fx.experimental._config": {k: repr(v) for k, v in fx_config.get_config_copy().items()},
            "torch": [torch.get_num_threads(), str(torch.get_default_dtype()), torch.get_float32_matmul_precision(),
                      torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled()]}


before = state()
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
after = state()
print(json.dumps({key: [before[key], after[key]] for key in before if before[key] != after[key]}))
"""


def python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)


def test_importing_panda_sets_no_filter_and_no_torch_setting():
    listed = python("import importlib, json, sys\n"
                    "start = set(sys.modules)\n"
                    f"for name in {PANDA!r}: importlib.import_module(name)\n"
                    "print(json.dumps([m for m in sys.modules if m not in start and m.split('.')[0] != 'panda']))")
    assert listed.returncode == 0, listed.stderr[-3000:]
    dependencies = listed.stdout.strip().splitlines()[-1]
    proc = python(STATE_AFTER_IMPORT, dependencies, json.dumps(PANDA))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


@pytest.fixture
def fake_torchvision(tmp_path):
    """A folder holding a ``torchvision`` package: ``working`` imports (and says so on stderr),
    ``broken`` fails as a CUDA-only build does on a CPU torch."""
    def make(kind: str) -> dict:
        package = tmp_path / kind / "torchvision"
        package.mkdir(parents=True)
        body = {"working": "import sys\nprint('torchvision imported', file=sys.stderr)\n",
                "broken": "raise RuntimeError('operator torchvision::nms does not exist')\n"}[kind]
        (package / "__init__.py").write_text(body)
        return {**os.environ, "PYTHONPATH": str(tmp_path / kind)}
    return make


def test_import_panda_does_not_import_torchvision(fake_torchvision):
    proc = python("import sys, panda; assert 'torchvision' not in sys.modules", env=fake_torchvision("working"))
    assert proc.returncode == 0 and "torchvision imported" not in proc.stderr, proc.stderr[-3000:]


def test_a_broken_torchvision_is_explained_where_a_run_starts(fake_torchvision):
    env = fake_torchvision("broken")
    proc = python("import panda; panda.check_torchvision()", env=env)
    assert "ImportError: torchvision is installed but does not import" in proc.stderr
    assert python("import panda", env=env).returncode == 0  # importing panda alone does not touch it
    for entry in (["train.py"], ["evaluate.py"], ["-m", "panda.plan"]):
        proc = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, timeout=300, cwd=REPO,
                              env=env)
        assert proc.returncode != 0 and "run `pip uninstall -y torchvision`" in proc.stderr, (entry, proc.stderr[-3000:])


def test_a_run_is_quiet_while_it_lasts_and_leaves_the_filters_as_they_were(monkeypatch):
    from panda.training import run
    from panda.training.trainer import QUIET_LOGGERS, quiet_lightning

    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    filters = [list(logger.filters) for logger in loggers]
    warning_filters = list(warnings.filters)
    tip = logging.LogRecord(QUIET_LOGGERS[0], logging.INFO, __file__, 1, "\U0001f4a1 Tip: try our cloud", None, None)
    with quiet_lightning():
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("Your dataloader is not resumable: it will restart from the beginning")
            warnings.warn("a warning that concerns panda", UserWarning)
        assert [str(w.message) for w in seen] == ["a warning that concerns panda"]
        assert not any(logger.filter(tip) for logger in loggers)
    assert [list(logger.filters) for logger in loggers] == filters and list(warnings.filters) == warning_filters
    assert all(logger.filter(tip) for logger in loggers)

    during = []

    def first_step_of_a_run(cfg):  # train()'s first call: look at the filters, then stop the run
        during.append([type(f).__name__ for logger in loggers for f in logger.filters])
        raise RuntimeError("stop here")

    monkeypatch.setattr(run, "to_train_config", first_step_of_a_run)
    with pytest.raises(RuntimeError, match="stop here"):
        run.train(None)
    assert during == [["_QuietLightning", "_QuietLightning"]]
    assert [list(logger.filters) for logger in loggers] == filters and list(warnings.filters) == warning_filters
