"""How a setting is named in cell and run names (``hftlab compare``, sweep run folders, plot
legends) and how a name a user writes (``--baseline poison_ratio=0.1``) finds its setting."""

from __future__ import annotations

# settings whose last part alone would read as another's (precision: model.precision)
QUALIFIED_NAMES = frozenset({"finetune.precision"})


def setting_name(key: str) -> str:
    """A setting's short name in cell and run names: the last part of its dotted key (the whole
    key where that part alone would name another setting); a field of a mix's source keeps the
    source's place (``sources[1].options``)."""
    if key in QUALIFIED_NAMES:
        return key
    if ".sources[" in key:
        return key[key.index(".sources[") + 1:]
    return key.rsplit(".", 1)[-1]


def names_setting(name: str, key: str) -> bool:
    """Whether ``name`` as a user writes it (``poison_ratio``, ``train.lr``, the whole key)
    names the setting ``key``: the key itself or a dotted tail of it, but never a qualified
    setting by its last part alone (``precision`` is model.precision)."""
    return key == name or (key.endswith(f".{name}") and key not in QUALIFIED_NAMES)
