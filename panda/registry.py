"""One registry per kind of part, and the one way to add a part: from your own module.

Each kind of part panda builds by name has one :class:`Registry` (``TEACHERS`` in
:mod:`panda.models.teachers`, ``PROJECTORS`` and ``REDUCERS`` (STAB's spatial reducer, ``stab.lsd``)
in :mod:`panda.models.stab`, ``BENCHMARKS`` in
:mod:`panda.evaluation.benchmarks`, ``JUDGES`` in :mod:`panda.evaluation.judge`, ``LOGGERS`` in
:mod:`panda.training.trainer`). Adding a part is one decorated class or function in a module of your
own, plus (for a group: teacher, judge, logger, benchmark) one YAML that names it::

    # my_parts.py, anywhere on PYTHONPATH
    from panda.models.stab import PROJECTORS

    @PROJECTORS.register("tanh_mlp")
    def tanh_mlp(in_dim, out_dim):
        return torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim), torch.nn.Tanh())

    python train.py plugins=[my_parts] model.projector=tanh_mlp

``plugins`` (in the train and evaluate configs) lists the modules imported before the config is
checked; a checkpoint keeps its run's list, so evaluation, export and chat import them again.
A YAML of your own lives in your own config folder: ``hydra.searchpath=[file:///path/to/conf]``.

Imports nothing of panda but :mod:`panda.errors`, so every layer may own a registry.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from panda.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> implementations of one kind of part. ``key`` is the config key that names one
    (``model.projector``) and ``where`` the registry's import path (``panda.models.stab.PROJECTORS``),
    both for messages."""

    def __init__(self, part: str, key: str, where: str):
        self.part, self.key, self.where = part, key, where
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` on a class or function. A second, different
        entry under a taken name is an error (re-importing the same module is not)."""

        def add(entry: T) -> T:
            known = self._entries.get(name)
            if known is not None and getattr(known, "__qualname__", None) != getattr(entry, "__qualname__", object()):
                raise ConfigError(f"{self.part} {name!r} is registered twice ({known!r} and {entry!r}): pick another name")
            self._entries[name] = entry
            return entry

        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"{self.key}={name!r}: no {self.part} of that name; the registered ones: "
                              f"{', '.join(self.names())} (add one with @{self.where.rsplit('.', 1)[1]}.register({name!r}), "
                              f"{self.where}, in a module listed in plugins=[...])")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)


def import_plugins(modules) -> None:
    """Import each module of ``plugins`` (its registrations run on import)."""
    for name in modules or ():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # the plugin itself, not something it imports
                raise ConfigError(f"plugins: no module {name!r} (is its folder on PYTHONPATH, or the package "
                                  "installed?)") from None
            raise
