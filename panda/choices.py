"""The base of every config choice. Imports nothing of panda, so any layer may use it: each choice is
one :class:`Choice` subclass, owned by the layer that acts on it (the data layer's tokenizations and
frame sampling modes, the model layer's LSD kinds and distillation losses, the run's choices in
:mod:`panda.config`)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A config choice: compares equal to its string value and prints as it. A dataclass field
    typed by one makes an unknown value fail at composition, with a message naming the key."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, key: str):
        """``value`` (a member or its string) as a member; else ``ValueError`` naming ``key`` and the choices
        (for values that come from Python or strings, not through a typed config)."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{key}={value!r}: use one of {', '.join(m.value for m in cls)}") from None
