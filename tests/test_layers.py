"""The package's layers point one way: each layer, imported alone in a fresh interpreter, pulls in
no panda module of a layer above it; and no import statement of a layer, at module level or inside
a function, names a panda module above it (a deferred import is a dependency all the same)."""

import ast
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import panda

BASE = {"panda.constants", "panda.errors", "panda.choices", "panda.registry", "panda.compat", "panda.paths", "panda.tokens"}  # and the package root ``panda`` itself
# layer -> the panda packages/modules it may import (besides itself and BASE)
ALLOWED = {
    "panda.constants": set(),
    "panda.errors": set(),
    "panda.choices": set(),
    "panda.registry": set(),
    "panda.compat": set(),  # the dependencies' private APIs, each behind one function
    "panda.paths": set(),  # where panda's own files (its configs) are
    "panda.tokens": set(),  # how many visual tokens a frame and a video get: the model, the token budget and the planner count with it
    "panda.runs": set(),
    "panda.models": {"panda.models"},
    "panda.data": {"panda.data"},
    "panda.config": {"panda.config", "panda.models", "panda.data"},
    "panda.overrides": {"panda.overrides", "panda.config", "panda.models", "panda.data", "panda.runs"},  # CLI checks
    "panda.build": {"panda.build", "panda.config", "panda.models", "panda.data"},  # panda.loading builds through it
    "panda.loading": {"panda.build", "panda.loading", "panda.config", "panda.models", "panda.data", "panda.hub"},
    "panda.evaluation": {"panda.evaluation", "panda.build", "panda.loading", "panda.config", "panda.models", "panda.data",
                         "panda.runs"},
    "panda.training": {"panda.training", "panda.evaluation", "panda.build", "panda.loading", "panda.config", "panda.models",
                       "panda.data", "panda.runs"},
    # an HF-native folder's code: the model and data layers only, so that the folder carries no more of panda
    "panda.hub": {"panda.hub", "panda.models", "panda.data"},
    # the model card of an export: the run's config and checkpoint (loading), its held-out intervals (evaluation)
    "panda.model_card": {"panda.model_card", "panda.evaluation", "panda.loading", "panda.build", "panda.config",
                         "panda.models", "panda.data", "panda.runs"},
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
    entry_points = {"panda.chat", "panda.demo", "panda.export", "panda.experiments", "panda.plan",  # the top: may import any layer
                    "panda.cli", "panda.train", "panda.evaluate"}
    assert tops - entry_points == set(ALLOWED), "give a new top-level module its place in ALLOWED"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_nothing_above_it(layer, imports_by_layer):
    allowed = BASE | ALLOWED[layer] | {layer}
    imported = imports_by_layer[layer]
    assert isinstance(imported, list), f"importing {layer} failed: {imported}"
    above = [m for m in imported if m != "panda" and not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not above, f"{layer} pulls in {above}"


def source_files(layer: str) -> list[str]:
    """The files of a layer: every ``.py`` file of a package (subpackages too), or the module's file."""
    module = __import__(layer, fromlist=["_"])
    if not hasattr(module, "__path__"):
        return [module.__file__]
    return sorted(os.path.join(folder, name) for root in module.__path__ for folder, _, names in os.walk(root)
                  for name in names if name.endswith(".py"))


def module_of(path: str) -> str:
    parts = os.path.relpath(os.path.splitext(path)[0], os.path.dirname(os.path.dirname(panda.__file__))).split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def panda_imports(path: str) -> list[tuple[str, int]]:
    """(panda module, line) for every import statement of ``path``, wherever it stands: module
    level, inside a function, under a condition. ``from panda import x`` names ``panda.x``; relative
    imports are resolved against the file's package."""
    module = module_of(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "panda":
                found += [(f"panda.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((base, node.lineno))
    return [(name, line) for name, line in found if name.startswith("panda.")]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_statement_of_a_layer_names_a_module_above_it(layer):
    allowed = BASE | ALLOWED[layer] | {layer}
    above = [f"{os.path.relpath(path, os.path.dirname(panda.__path__[0]))}:{line} imports {name}"
             for path in source_files(layer) for name, line in panda_imports(path)
             if not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert not above, "\n".join(above)


def test_no_two_layers_may_import_each_other():
    both_ways = sorted({tuple(sorted((a, b))) for a in ALLOWED for b in ALLOWED[a] - {a} if a in ALLOWED.get(b, ())})
    assert not both_ways, f"these layers may import each other: {both_ways}"


def test_function_level_imports_are_seen(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("import os\n\ndef f():\n    from panda.loading import load_model\n    import panda.build\n"
                    "    if True:\n        from panda import training\n")
    names = [name for name, _ in panda_imports(str(path))]
    assert names == ["panda.loading", "panda.build", "panda.training"]
