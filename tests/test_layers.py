"""The package's layers point one way (architecture.md): each layer, imported alone in a fresh
interpreter, pulls in no panda module of a layer above it."""

import json
import pkgutil
import subprocess
import sys

import pytest

import panda

BASE = {"panda.constants", "panda.errors"}  # and the package root ``panda`` itself
# layer -> the panda packages/modules it may import (besides itself and BASE)
ALLOWED = {
    "panda.constants": set(),
    "panda.errors": set(),
    "panda.runs": set(),
    "panda.models": {"panda.models"},
    "panda.data": {"panda.data"},
    "panda.config": {"panda.config", "panda.models", "panda.data"},
    "panda.build": {"panda.build", "panda.loading", "panda.config", "panda.models", "panda.data"},
    "panda.loading": {"panda.build", "panda.loading", "panda.config", "panda.models", "panda.data"},
    "panda.evaluation": {"panda.evaluation", "panda.build", "panda.loading", "panda.config", "panda.models", "panda.data",
                         "panda.runs"},
    "panda.training": {"panda.training", "panda.evaluation", "panda.build", "panda.loading", "panda.config", "panda.models",
                       "panda.data", "panda.runs"},
}


def modules_of(layer: str) -> list[str]:
    """The layer's own modules: a package's submodules, or the module itself."""
    module = __import__(layer, fromlist=["_"])
    if not hasattr(module, "__path__"):
        return [layer]
    return [layer] + [f"{layer}.{m.name}" for m in pkgutil.iter_modules(module.__path__)]


def imported_panda_modules(modules: list[str]) -> list[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'panda' or m.startswith('panda.'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_top_level_module_has_a_layer():
    tops = {f"panda.{m.name}" for m in pkgutil.iter_modules(panda.__path__)}
    entry_points = {"panda.chat", "panda.export", "panda.experiments"}  # the top: may import any layer
    assert tops - entry_points == set(ALLOWED), "give a new top-level module its place in ALLOWED"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_nothing_above_it(layer):
    allowed = BASE | ALLOWED[layer] | {layer}
    imported = imported_panda_modules(modules_of(layer))
    above = [m for m in imported if m != "panda" and not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not above, f"{layer} pulls in {above}"
