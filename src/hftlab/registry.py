"""A small name → class registry shared by defenses, attacks and judges (one file per plug-in)."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Generic, TypeVar

from hftlab.errors import ConfigError, unknown_name_message
from hftlab.options import build

__all__ = ["Plugin", "Registry", "unknown_name_message"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to plug-in classes; unknown names fail with the known ones and a did-you-mean."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str):
        def decorator(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return decorator

    def get(self, name: str) -> type[T]:
        if name not in self._items:
            raise KeyError(unknown_name_message(self.kind, name, list(self._items)))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


class Plugin(abc.ABC):  # noqa: B024  (subclass bases declare the abstract hooks)
    """Base of defenses, attacks and judges: a name, one-line docs, and typed options.

    A plug-in declares its options as a dataclass in ``Options``; the config's ``*_args``
    mapping is validated against it (unknown keys and wrong types fail), so no option is ever
    accepted and ignored.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Options: ClassVar[type | None] = None

    def __init__(self, **options: Any) -> None:
        if self.Options is None:
            if options:
                raise ConfigError(
                    f"'{self.name}' takes no options, got {sorted(options)}: remove them"
                )
            self.options = None
        else:
            where = f"options of '{self.name}'"
            self.options = build(self.Options, options, where=where, prefix="")

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options) if self.options is not None else {}

    @classmethod
    def doc_line(cls) -> str:
        return cls.summary or (cls.__doc__ or "").strip().splitlines()[0]
