"""Command-line overrides checked before Hydra composes them, so that a typo fails with panda's own
one-line message (exit code 2) instead of silently changing what a run is:

- a group choice that is not a file of its group (``experiment=ablation/no_fsr``,
  ``variant=table5_mes``, ``debug=fast_dev``) names the closest options in that group. Without this
  check an ``optional`` group skipped a missing file, and a sweep trained the baseline under the
  ablation's name;
- a key that is not in the typed schema (``trainer.max_step=5``, ``+trainer.max_step=5``) names the
  closest key, instead of Hydra's "To append to your config use +..." (which then fails anyway);
- a value that is none of a choice key's options (``stab.lsd=maxpool``: the key's type is a
  :class:`panda.choices.Choice`) names the options;
- a key the group's choice sets (``logger.kind``: ``logger=csv logger.kind=wandb`` said two things)
  and a key that was renamed (``ckpt_path`` is ``resume``) say what to write instead.

``panda train`` (``train.py``), ``panda evaluate`` (``evaluate.py``) and ``panda plan`` run
:func:`check_overrides` on their arguments; the same group options are what Hydra itself would find
(its own search path: panda's config folder, :func:`panda.paths.config_dir`, and a user's folders
given by ``--config-dir`` or ``hydra.searchpath=[...]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Iterable

from panda.paths import config_dir as panda_config_dir


def _choices(override) -> list[str]:
    """The option names one override asks for: a value, a list (``benchmark=[a,b]``) or a sweep
    (``experiment=a,b``); empty for values only Hydra can expand (``glob(...)``) and for ``null``."""
    from hydra.core.override_parser.types import ValueType

    if override.is_delete() and override.value() is None:
        return []
    if override.value_type in (ValueType.GLOB_CHOICE_SWEEP, ValueType.RANGE_SWEEP, ValueType.INTERVAL_SWEEP):
        return []
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    flat: list[Any] = []
    for value in values:
        flat += value if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in flat if v is not None and str(v) != "null"]


class _Groups:
    """The config groups and their options as Hydra's loader sees them for one config."""

    def __init__(self, config_dir: str, config_name: str, searchpath: list[str]):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from panda.config import register_configs

        register_configs()
        self._cache: dict[tuple[str, Any], list[str]] = {}
        self._name, self._searchpath = config_name, searchpath
        self._init = initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base="1.3")
        self._init.__enter__()
        self._loader = GlobalHydra.instance().config_loader()

    def close(self) -> None:
        self._init.__exit__(None, None, None)

    def _list(self, group: str, kind) -> list[str]:
        key = (group, kind)
        if key not in self._cache:
            self._cache[key] = self._loader.get_group_options(group, results_filter=kind, config_name=self._name,
                                                              overrides=self._searchpath)
        return self._cache[key]

    def is_group(self, name: str) -> bool:
        from hydra.core.object_type import ObjectType

        parent, _, leaf = name.rpartition("/")
        return leaf in self._list(parent, ObjectType.GROUP)

    def options(self, group: str) -> list[str]:
        """Every option of ``group``, those in sub-folders as ``sub/name`` (``ablation/no_fsra``)."""
        from hydra.core.object_type import ObjectType

        found = list(self._list(group, ObjectType.CONFIG))
        for sub in self._list(group, ObjectType.GROUP):
            found += [f"{sub}/{name}" for name in self.options(f"{group}/{sub}")]
        return sorted(found)


def _closest(word: str, names: Iterable[str], n: int = 3) -> list[str]:
    names = list(names)
    close = difflib.get_close_matches(word, names, n=n, cutoff=0.6)
    if not close:  # the last path part alone (``ablation/no_fsr`` vs ``frames/no_fsr``)
        leaf = word.rsplit("/", 1)[-1]
        close = [name for name in names if leaf and leaf in name][:n]
    return close


def _unknown_group_choice(group: str, choice: str, options: list[str]) -> str:
    close = _closest(choice, options)
    hint = f"did you mean {' or '.join(f'{group}={c}' for c in close)}?" if close else \
        f"the options are: {', '.join(options[:20])}{', ...' if len(options) > 20 else ''}"
    return f"{group}={choice}: there is no config {choice!r} in group {group!r} (conf/{group}/{choice}.yaml); {hint}"


# keys an older panda had, and what says it now
RENAMED = {"ckpt_path": "resume (resume=last continues this run dir, resume=PATH a checkpoint, resume=auto the "
                        "newest checkpoint of this run's name)"}


# keys that a group's choice sets: said once, by choosing the group's option (logger=wandb), never beside it
CHOSEN_BY_GROUP = {"logger.kind": "logger", "teacher.kind": "teacher", "judge.kind": "judge"}


def _unwrap(tp):
    """``Optional[X]`` -> ``X``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0]
    return tp


def schema_key(key: str, schema: type) -> tuple[Any, str | None]:
    """Walk ``schema`` along ``key`` (dotted): (the key's type, ``Optional`` unwrapped, or None below a
    free-form value such as a ``dict``, ``Any`` or a list, which accepts every key; the key with the
    closest known one when the schema lacks it, ``trainer.max_step (did you mean trainer.max_steps?)``,
    else None)."""
    node, done = schema, []
    for part in key.split("."):
        node = _unwrap(node)
        if typing.get_origin(node) in (dict, typing.Dict):  # e.g. evaluate.py's benchmark map: any name
            node = typing.get_args(node)[1] if typing.get_args(node) else Any
            done.append(part)
            continue
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None, None  # below a free-form value: Hydra and the schema's types judge it
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            prefix = ".".join(done + [""]) if done else ""
            close = difflib.get_close_matches(part, names, n=1)
            return None, key + (f" (did you mean {prefix}{close[0]}?)" if close else "")
        node = typing.get_type_hints(node)[part]
        done.append(part)
    return _unwrap(node), None


def _unknown_choice(key: str, kind, override) -> list[str]:
    """``stab.lsd=maxpool``: a value that is none of a choice key's options (``kind``, the key's type),
    naming them (what Hydra would refuse at composition, said in one line)."""
    from panda.choices import Choice

    if not (isinstance(kind, type) and issubclass(kind, Choice)):
        return []
    options = [m.value for m in kind]
    return [f"{key}={value}: use one of {', '.join(options)}" for value in _choices(override)
            if value not in options and "${" not in value]


def hydra_overrides(argv: list[str]) -> tuple[list[str], str | None]:
    """The overrides of a Hydra command line (flags such as ``--multirun`` and ``--cfg job`` left
    out) and its ``--config-dir``, parsed by Hydra's own argument parser."""
    from panda.compat import hydra_args_parser

    args, _ = hydra_args_parser().parse_known_args(argv)
    return list(args.overrides), args.config_dir


def searchpath_override(overrides: list[str], extra_dirs: Iterable[str] = ()) -> list[str]:
    """One ``hydra.searchpath=[...]`` override (none when there is nothing to add) with every folder a
    command line adds to panda's: ``--config-dir`` (``extra_dirs``) and its own ``hydra.searchpath``
    (Hydra reads both; of two ``hydra.searchpath`` overrides its loader would read only the last)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    dirs = ["file://" + os.path.abspath(d) for d in extra_dirs]
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "hydra.searchpath" and not override.is_delete():
            value = override.value()
            dirs += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    quoted = ("'" + d.replace("'", "\\'") + "'" for d in dirs)
    return [f"hydra.searchpath=[{','.join(quoted)}]"] if dirs else []


def check_overrides(overrides: list[str], schema: type, config_name: str = "train", config_dir: str | None = None,
                    extra_dirs: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` (one message listing every problem) when an override names a group
    option that does not exist or a key the schema lacks. ``hydra.*`` overrides are Hydra's own.
    The options are those of ``config_dir`` (panda's own by default) and of the folders a user adds:
    ``extra_dirs`` (``--config-dir``) and ``hydra.searchpath=[...]`` among the overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from panda.config import unknown_keys_error

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:  # not an override at all (e.g. a missing '='): Hydra's own message says where
        raise ValueError(str(exc).strip()) from None
    groups = _Groups(config_dir or panda_config_dir(), config_name, searchpath_override(overrides, extra_dirs))
    problems, unknown = [], []
    try:
        for override in parsed:
            name = override.key_or_group
            if name == "hydra" or name.startswith(("hydra.", "hydra/")):
                continue
            if groups.is_group(name):
                options = groups.options(name)
                problems += [_unknown_group_choice(name, c, options) for c in _choices(override) if c not in options]
            elif name in CHOSEN_BY_GROUP:
                group = CHOSEN_BY_GROUP[name]
                problems.append(f"{name} is set by the {group} group: choose {group}=<option> instead "
                                f"(the options: {', '.join(groups.options(group))})")
            elif name in RENAMED:
                problems.append(f"{name} is now {RENAMED[name]}")
            elif not override.is_delete():
                kind, missing = schema_key(name, schema)
                unknown += [missing] if missing else []
                problems += _unknown_choice(name, kind, override)
    finally:
        groups.close()
    if unknown:
        problems.append(str(unknown_keys_error(unknown)))
    if problems:
        raise ValueError("\n  ".join(problems))


def check_command_line(entry: str, schema: type, config_name: str, argv: list[str]) -> None:
    """:func:`check_overrides` on an entry point's command line; a problem ends the process with
    panda's one-line message and exit code 2 (before Hydra makes a run folder)."""
    from panda.runs import exit_on_config_error

    overrides, config_dir = hydra_overrides(argv)
    try:
        check_overrides(overrides, schema, config_name, extra_dirs=[config_dir] if config_dir else ())
    except ValueError as exc:
        exit_on_config_error(entry, exc)


def run_hydra_app(prog: str, schema: type, config_name: str, task, argv: list[str] | None = None) -> None:
    """An entry point's main: check ``argv``'s overrides (:func:`check_command_line`: a misspelt group
    option or key exits 2 before Hydra makes a run folder), then run ``task`` as a Hydra application
    on panda's config folder with ``argv`` as its command line (``sys.argv[1:]`` when None)."""
    import sys

    import hydra

    argv = sys.argv[1:] if argv is None else list(argv)
    check_command_line(prog, schema, config_name, argv)
    sys.argv = [sys.argv[0], *argv]  # Hydra reads its command line there
    hydra.main(version_base="1.3", config_path=panda_config_dir(), config_name=config_name)(task)()
