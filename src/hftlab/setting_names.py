"""How a setting is named in cell and run names (``hftlab compare``, sweep run folders, plot
legends) and how a name a user writes (``--baseline poison_ratio=0.1``) finds its setting."""

from __future__ import annotations

from collections.abc import Iterable

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


def setting_names(keys: Iterable[str]) -> dict[str, str]:
    """Each key's :func:`setting_name`, but where two keys would share one (the alignment's and
    the fine-tuning's LoRA ``r``) each gets the shortest dotted tail the other lacks
    (``alignment.train.lora.r``, ``finetune.train.lora.r``)."""
    keys = list(dict.fromkeys(keys))
    short = {key: setting_name(key) for key in keys}
    names = dict(short)
    for key in keys:
        rivals = [other for other in keys if other != key and short[other] == short[key]]
        if not rivals:
            continue
        parts = key.split(".")
        for size in range(2, len(parts) + 1):
            names[key] = ".".join(parts[-size:])
            if not any(r == names[key] or r.endswith(f".{names[key]}") for r in rivals):
                break
    return names


def names_setting(name: str, key: str) -> bool:
    """Whether ``name`` as a user writes it (``poison_ratio``, ``train.lr``, the whole key)
    names the setting ``key``: the key itself or a dotted tail of it, but never a qualified
    setting by its last part alone (``precision`` is model.precision)."""
    return key == name or (key.endswith(f".{name}") and key not in QUALIFIED_NAMES)
