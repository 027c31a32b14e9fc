"""The error every bad setting raises, and the did-you-mean text for an unknown name. Imports
nothing from hftlab, so that the config, the option builder and the plug-in registries can all
use it without importing one another."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A bad config: the message names the file, the key and the fix."""


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'.{hint} Known: {', '.join(sorted(known))}."
