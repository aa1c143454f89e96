"""Map official state_dicts (HiFuse, HEMF, RMT) onto fusionblocks modules, strictly.

A converter is an ordered list of ``(regex, replacement)`` rules applied to each official key (the
first rule that matches wins; unmatched keys keep their name) plus a list of regexes for keys that are
dropped on purpose (modules the official forward never calls, buffers recomputed here). Anything else
that does not line up — a missing key, an unexpected key, a shape mismatch — is an error naming it.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

Rule = Tuple[str, str]


def convert_keys(
    state_dict: Mapping[str, torch.Tensor], rules: Sequence[Rule], drop: Iterable[str] = ()
) -> Dict[str, Tuple[str, torch.Tensor]]:
    """Official key -> our key. Returns ``{our_key: (official_key, tensor)}``."""
    compiled = [(re.compile(p), r) for p, r in rules]
    dropped = [re.compile(p) for p in drop]
    out: Dict[str, Tuple[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if any(d.fullmatch(key) for d in dropped):
            continue
        new = key
        for pat, rep in compiled:
            if pat.fullmatch(key):
                new = pat.sub(rep, key)
                break
        if new in out:
            raise KeyError(f"official keys {out[new][0]!r} and {key!r} both map to {new!r}")
        out[new] = (key, value)
    return out


def load_official(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    drop: Iterable[str] = (),
    *,
    source: str,
) -> None:
    """Load an official ``state_dict`` into ``model`` strictly after renaming by ``rules``.

    Raises:
        KeyError: a key of ``model`` has no official counterpart, or an official key maps to nothing
            in ``model`` (both named, with the official spelling).
        ValueError: a tensor's shape differs (named, expected and received).
    """
    name = type(model).__name__
    mapped = convert_keys(state_dict, rules, drop)
    ours = model.state_dict()
    missing = [k for k in ours if k not in mapped]
    unexpected = [official for k, (official, _) in mapped.items() if k not in ours]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing official keys for {len(missing)} parameters/buffers: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {source} keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise KeyError(f"{name}.load_official_state_dict ({source}): " + "; ".join(parts))
    for k, (official, value) in mapped.items():
        if tuple(ours[k].shape) != tuple(value.shape):
            raise ValueError(
                f"{name}.load_official_state_dict ({source}): {official!r} -> {k!r}: expected shape "
                f"{tuple(ours[k].shape)}, got {tuple(value.shape)}"
            )
    model.load_state_dict({k: v for k, (_, v) in mapped.items()}, strict=True)
