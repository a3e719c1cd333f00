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
    "panda.overrides": {"panda.overrides", "panda.config", "panda.models", "panda.data", "panda.runs"},  # CLI checks
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


def _import_script(modules: list[str]) -> str:
    return ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'panda' or m.startswith('panda.'))))")


@pytest.fixture(scope="module")
def imports_by_layer() -> dict[str, list[str]]:
    """For each layer, the panda modules a fresh interpreter holds after importing that layer's
    modules (and nothing else); the interpreters run side by side."""
    procs = {layer: subprocess.Popen([sys.executable, "-c", _import_script(modules_of(layer))],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for layer in ALLOWED}
    out = {}
    for layer, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[layer] = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 else stderr[-3000:]
    return out


def test_every_top_level_module_has_a_layer():
    tops = {f"panda.{m.name}" for m in pkgutil.iter_modules(panda.__path__)}
    entry_points = {"panda.chat", "panda.export", "panda.experiments", "panda.plan"}  # the top: may import any layer
    assert tops - entry_points == set(ALLOWED), "give a new top-level module its place in ALLOWED"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_nothing_above_it(layer, imports_by_layer):
    allowed = BASE | ALLOWED[layer] | {layer}
    imported = imports_by_layer[layer]
    assert isinstance(imported, list), f"importing {layer} failed: {imported}"
    above = [m for m in imported if m != "panda" and not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not above, f"{layer} pulls in {above}"
