"""The documentation site: the generated configuration reference matches the code, every key of
panda/config.py has help text, and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "docs" / "gen_config_reference.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_is_what_the_generator_writes():
    gen = _generator()
    page = REPO / "docs" / "configuration.md"
    assert page.exists(), f"docs/configuration.md is missing; generate it: {gen.COMMAND}"
    if page.read_text() != gen.render():
        pytest.fail(f"docs/configuration.md is out of date with the config dataclasses or conf/; regenerate it: "
                    f"{gen.COMMAND}", pytrace=False)


def test_every_key_of_the_config_schemas_has_help_text():
    """A field of a dataclass in panda/config.py needs a comment on its line or directly above it:
    that comment is its help text in docs/configuration.md."""
    missing = _generator().missing_help()
    assert not missing, ("these config keys have no help text; add a one-line comment on the field in "
                         "panda/config.py, then regenerate docs/configuration.md:\n  " + "\n  ".join(missing))


def _mkdocs() -> Path:
    for candidate in (Path(sys.executable).parent / "mkdocs", REPO / ".venv" / "bin" / "mkdocs"):
        if candidate.exists():
            return candidate
    pytest.fail('mkdocs is not installed: pip install -c constraints.txt -e ".[docs]" (install.sh installs it)',
                pytrace=False)


def test_the_site_builds_with_mkdocs_strict(tmp_path):
    result = subprocess.run([str(_mkdocs()), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    warnings, inside = [], False
    for line in (result.stdout + result.stderr).splitlines():  # each warning, with its indented continuation
        inside = line.startswith(("WARNING", "ERROR")) or (inside and line.startswith((" ", "\t")))
        if inside or line.startswith("Aborted"):
            warnings.append(line)
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings or [result.stderr[-3000:]])
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
