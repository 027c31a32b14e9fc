"""User-written YAML (config files, sweep files, ``key=value`` values): the safe loader, keys
given twice refused, every problem one ConfigError line naming the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hftlab.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently, so a setting written twice would be half ignored)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # ``<<: *base`` keys may be overridden: that is what merging is for
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable: the base class reports it
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping (lines counted from 1)."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line


def load_yaml(text: str, source: str, lines: bool = True) -> Any:
    """Parse user-written YAML with the safe loader, refusing duplicate keys; any problem is one
    ConfigError line naming ``source`` (and the line, when ``lines``: a file, not a value)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no objects
    except _DuplicateKey as exc:
        where = f"{source}:{exc.line}" if lines else source
        also = f" (also on line {exc.first_line})" if lines else ""
        raise ConfigError(f"{where}: key '{exc.key}' is given twice in one mapping{also}; "
                          "keep one of them") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if lines and mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(detail).split())}") from exc


def read_yaml_mapping(path: Path, what: str, empty_hint: str = "") -> dict[str, Any]:
    """A YAML file whose top level is a non-empty mapping, or one ConfigError naming the file.

    An empty file (or one of comments or ``null`` only) is an error, not an empty mapping: a
    run from a file that lost its contents would otherwise silently run the defaults."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc}); give a readable UTF-8 YAML "
                          "file") from exc
    raw = load_yaml(text, str(path))
    if raw is None:
        hint = empty_hint or "give it at least one key"
        raise ConfigError(f"{what} {path} is empty (nothing but comments or null); {hint}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return raw
