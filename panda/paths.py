"""Where panda's own files are. Imports nothing of panda: any layer may ask."""

from __future__ import annotations

import importlib.util
import os


def config_dir() -> str:
    """panda's config folder, the one place that says where it is: ``conf/`` of the repository in a
    checkout (an editable install maps the package ``panda.conf`` onto it), ``panda/conf`` of an
    installed wheel. A folder of your own composes on top of it through Hydra's search path
    (``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``), see docs/use-as-a-dependency.md."""
    spec = importlib.util.find_spec("panda.conf")  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        raise FileNotFoundError("panda's configs (the package panda.conf) are not installed: reinstall panda "
                                "(pip install -e . in a checkout)")
    return os.path.dirname(spec.origin)
