"""Map official state_dicts (HiFuse, HEMF, RMT) onto fusionblocks modules, strictly.

A converter is an ordered list of ``(regex, replacement)`` rules applied to each official key (the
first rule that matches wins; unmatched keys keep their name) plus a list of regexes for keys that are
dropped on purpose (modules the official forward never calls, buffers recomputed here). Anything else
that does not line up — a missing key, an unexpected key, a shape mismatch — is an error naming it.
Patterns are matched with ``fullmatch`` and carry no ``^``/``$`` anchors.

Convention (every module with an official counterpart follows it):

* ``module.official_key_rules(...) -> (rules, drop)`` maps the official keys of that one module, without
  any prefix, onto its own ``state_dict`` keys. It is a classmethod where the mapping does not depend on
  how the module was built (``IRMLP``, ``SIRMLP``, ``MultiHeadExternalAttention``,
  ``ManhattanSelfAttention``, and ``MixedAttention``, whose argument is the official branch suffix) and a
  method otherwise (``HFF``/``HEF`` drop the path they do not build, ``EGFBlock`` maps its layers,
  ``HiFuse``/``HEMF`` map the whole network).
* A parent places a child's pair under both prefixes with :func:`prefix_rules` and concatenates pairs
  with :func:`join_rules`.
* Modules that load a complete official ``state_dict`` by themselves inherit :class:`OfficialWeights`,
  which supplies ``load_official_state_dict`` from ``official_key_rules()`` and ``official_source``.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

Rule = Tuple[str, str]
KeyRules = Tuple[List[Rule], List[str]]
"""``(rules, drop)`` as returned by ``official_key_rules``."""


def prefix_rules(
    official_prefix: str,
    our_prefix: str,
    rules: Sequence[Rule] = (),
    drop: Sequence[str] = (),
    *,
    rest: bool = False,
) -> KeyRules:
    """Place a module's own ``(rules, drop)`` where the module sits inside a parent.

    Args:
        official_prefix: the literal official prefix, e.g. ``"fu2."`` (escaped here; it adds no regex group,
            so the group numbers of ``rules`` stay valid).
        our_prefix: the literal prefix of our module, e.g. ``"fusion.1."``.
        rules: the module's rename rules.
        drop: the module's dropped-key regexes.
        rest: also rename every other official key under the prefix, ``official_prefix + k ->
            our_prefix + k`` (appended last), for modules whose remaining keys keep their names.

    Returns:
        ``(rules, drop)`` that match ``official_prefix + key``, for the parent.
    """
    head = re.escape(official_prefix)
    repl = our_prefix.replace("\\", "\\\\")
    out = [(head + pat, repl + rep) for pat, rep in rules]
    if rest:
        out.append((head + r"(.*)", repl + r"\1"))
    return out, [head + pat for pat in drop]


def join_rules(*parts: KeyRules) -> KeyRules:
    """Concatenate ``(rules, drop)`` pairs, keeping their order (the first matching rule wins)."""
    return [r for rules, _ in parts for r in rules], [d for _, drop in parts for d in drop]


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


def _template(pattern: str):
    """``pattern`` as literal pieces and group numbers (``["fu1.", 1, ".weight"]``), or ``None`` when it holds
    regex syntax outside its capturing groups (then it cannot be run backwards)."""
    out: List[object] = []
    lit, i, group = "", 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            if pattern[i + 1].isalnum():
                return None
            lit += pattern[i + 1]
            i += 2
        elif c == "(":
            if pattern.startswith("(?", i):
                return None
            depth, j = 0, i
            while j < len(pattern):
                if pattern[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(pattern[j], 0)
                j += 1
                if depth == 0:
                    break
            group += 1
            out += [lit, group]
            lit, i = "", j
        elif c in ".^$*+?{}[]|)":
            return None
        else:
            lit += c
            i += 1
    return out + [lit]


def official_key_for(key: str, rules: Sequence[Rule], drop: Iterable[str] = ()) -> Optional[str]:
    """The official key that ``rules`` map onto our ``key`` (the inverse of :func:`convert_keys` for one key), or
    ``None`` when no official spelling can be derived. A key no rule renames is its own official name."""
    compiled = [(re.compile(p), r) for p, r in rules]
    dropped = [re.compile(p) for p in drop]

    def forward(official: str) -> Optional[str]:
        if any(d.fullmatch(official) for d in dropped):
            return None
        for pat, rep in compiled:
            if pat.fullmatch(official):
                return pat.sub(rep, official)
        return official

    candidates = []
    for pat, rep in rules:
        tpl = _template(pat)
        if tpl is None:
            continue
        # the replacement as a regex: literals escaped, each group reference a named capture
        parts = re.split(r"\\(\d+)", rep)
        seen, rx = set(), ""
        for j, part in enumerate(parts):
            if j % 2 == 0:
                rx += re.escape(part.replace("\\\\", "\\"))
            elif part in seen:
                rx += f"(?P=g{part})"
            else:
                seen.add(part)
                rx += f"(?P<g{part}>.*?)"
        m = re.fullmatch(rx, key)
        if m is None:
            continue
        values = m.groupdict()
        if any(isinstance(t, int) and f"g{t}" not in values for t in tpl):
            continue
        candidates.append("".join(str(values[f"g{t}"]) if isinstance(t, int) else t for t in tpl))
    # the earliest rule first (rules run most specific first), the key's own name last
    for official in candidates + [key]:
        if forward(official) == key:
            return official
    return None


#: prefixes a wrapper puts before every key of the module it wraps: DataParallel / DistributedDataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_keys(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state_dict`` without the wrapper prefixes (:data:`WRAPPER_PREFIXES`, nested in any order) that all of its
    keys share; as given when they do not all share one."""
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def nested_state_dict(ckpt: Mapping[str, object]) -> Mapping[str, object]:
    """The state_dict of a checkpoint file: under ``model`` and/or ``state_dict`` as official and torchvision
    training scripts often save it, or the file's dict itself."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
    return ckpt


def load_official(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    drop: Iterable[str] = (),
    *,
    source: str,
) -> None:
    """Load an official ``state_dict`` into ``model`` strictly after renaming by ``rules``.

    A missing BatchNorm ``num_batches_tracked`` keeps the module's current value, as
    ``nn.Module.load_state_dict`` does (it counts steps, it holds no weights). The prefix a wrapper adds to every
    key (``module.``: the official code run under ``DataParallel`` / ``DistributedDataParallel``; ``_orig_mod.``:
    under ``torch.compile``) is taken off first (:func:`unwrap_keys`).

    Raises:
        KeyError: a key of ``model`` has no official counterpart, or an official key maps to nothing
            in ``model``. Both are named with the official spelling (the keys of ``state_dict``), in the
            order of the official state_dict; a missing key is placed after the official key that comes
            before it in ``model``.
        ValueError: a tensor's shape differs (named, expected and received).
    """
    name = type(model).__name__
    drop = list(drop)
    state_dict = unwrap_keys(state_dict)
    mapped = convert_keys(state_dict, rules, drop)
    ours = model.state_dict()
    for k, v in ours.items():
        if k not in mapped and k.endswith("num_batches_tracked"):
            mapped[k] = (k, v)
    file_pos = {official: i for i, official in enumerate(state_dict)}
    missing, last = [], -1
    for j, k in enumerate(ours):
        if k in mapped:
            last = file_pos.get(mapped[k][0], last)
        else:
            missing.append((last, j, k))
    unexpected = [official for k, (official, _) in mapped.items() if k not in ours]
    if missing or unexpected:
        parts = []
        if missing:
            names = []
            for _, _, k in sorted(missing):
                official = official_key_for(k, rules, drop)
                names.append(official if official is not None else f"{k} (fusionblocks name; no official spelling)")
            parts.append(f"missing official keys ({len(names)}): {names[:8]}{' ...' if len(names) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected official keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise KeyError(f"{name}.load_official_state_dict ({source}): " + "; ".join(parts))
    for k, (official, value) in mapped.items():
        if tuple(ours[k].shape) != tuple(value.shape):
            raise ValueError(
                f"{name}.load_official_state_dict ({source}): {official!r} -> {k!r}: expected shape "
                f"{tuple(ours[k].shape)}, got {tuple(value.shape)}"
            )
    model.load_state_dict({k: v for k, (_, v) in mapped.items()}, strict=True)


class OfficialWeights:
    """Mixin for ``nn.Module`` s that load an official ``state_dict`` by themselves.

    Subclasses set ``official_source`` (named in errors) and implement ``official_key_rules()``.
    """

    official_source: str = "official"

    def official_key_rules(self) -> KeyRules:
        """``(rules, drop)`` mapping the official ``state_dict`` onto this module (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} has no official checkpoint mapping")

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load an official ``state_dict`` strictly (missing/unexpected keys and shape mismatches are named).

        Raises:
            KeyError: a missing or unexpected key.
            ValueError: a shape mismatch.
        """
        load_official(self, state_dict, *self.official_key_rules(), source=self.official_source)
