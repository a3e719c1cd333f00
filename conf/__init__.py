"""panda's configs. The YAML files in this folder are the configs; this file makes the folder the
package ``panda.conf`` of an installed panda (pyproject.toml maps it), found by
``panda.paths.config_dir()``. Hydra lists neither this file nor ``__pycache__``."""
