"""Validation of nested config dataclasses, before a run writes anything.

A config class lists its own bad values in a method ``invalid(self) -> list[Bad]``; this module
walks a nested config, collects every problem and names it as the CLI spells it
(``--reflector.api.timeout-s -1: must be > 0``), one line per problem. The experiments call
:func:`check_config` first thing, so a bad value fails in a second with one clear line instead
of after the collect phase (or after ``config.json`` and empty artefacts were written).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple


class ConfigError(ValueError):
    """One or more config values outside their allowed range (one line each)."""


class Bad(NamedTuple):
    """A bad config value: the field, what it must be, and whether the value may be shown."""

    field: str
    allowed: str
    secret: bool = False
    """Never print the value (an API key typed where a variable name belongs)."""


Rule = Callable[[Any], list[Bad]]


def option(path: str) -> str:
    """The CLI spelling of a dotted field path: ``reflector.api.timeout_s`` ->
    ``--reflector.api.timeout-s``."""
    return "--" + path.replace("_", "-")


def problems(cfg: Any, prefix: str = "", rules: Mapping[type, Rule] | None = None) -> list[str]:
    """Every bad value in ``cfg`` and its nested configs, as one line each. ``rules`` adds
    checks for config classes that have no ``invalid`` method of their own."""
    out = []
    found = list(getattr(cfg, "invalid", lambda: [])())
    if rules and type(cfg) in rules:
        found += rules[type(cfg)](cfg)
    for bad in found:
        value = "(value not shown)" if bad.secret else repr(_get(cfg, bad.field))
        out.append(f"{option(prefix + bad.field)} {value}: must be {bad.allowed}")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out += problems(v, f"{prefix}{f.name}.", rules)
        elif isinstance(v, float) and not math.isfinite(v):
            out.append(f"{option(prefix + f.name)} {v!r}: must be a finite number")
    return out


def _get(cfg: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        cfg = getattr(cfg, name, None)
    return cfg


def changed_leaves(cfg: Any, default: Any, path: str, allowed: str) -> list[Bad]:
    """A :class:`Bad` for each leaf of the nested config ``cfg`` (at ``path``) that differs
    from ``default``: for sub-configs a script derives and would otherwise silently replace."""
    out = []
    for f in dataclasses.fields(cfg):
        a, b = getattr(cfg, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            out += changed_leaves(a, b, f"{path}.{f.name}", allowed)
        elif a != b:
            out.append(Bad(f"{path}.{f.name}", allowed))
    return out


def check_config(cfg: Any, prefix: str = "", rules: Mapping[type, Rule] | None = None) -> None:
    """Raise :class:`ConfigError` listing every bad value (see :func:`problems`)."""
    found = problems(cfg, prefix, rules)
    if found:
        raise ConfigError("\n".join(found))


def at_least(cfg: Any, lo: float, *names: str) -> list[Bad]:
    """A :class:`Bad` for each field in ``names`` below ``lo``."""
    return [Bad(n, f">= {lo:g}") for n in names if not getattr(cfg, n) >= lo]


def greater_than(cfg: Any, lo: float, *names: str) -> list[Bad]:
    """A :class:`Bad` for each field in ``names`` not above ``lo``."""
    return [Bad(n, f"> {lo:g}") for n in names if not getattr(cfg, n) > lo]


SEED_LIMIT = 2**32
"""Seeds live in [0, 2**32): JAX folds them into uint32 key words, so a negative or larger seed
fails deep inside a run (``fold_in``: out of bounds for uint32) or silently draws another
seed's keys (``key(2**32 + s)`` is ``key(s)``)."""

SEED_RANGE = "in [0, 2**32)"


def seed_problem(seeds: Sequence[int], empty_ok: bool = False) -> str | None:
    """What is wrong with a tuple of seeds, or None: each in [0, 2**32) (:data:`SEED_LIMIT`),
    no duplicates (a seed given twice would count one trajectory or training run as two
    independent ones), at least one unless ``empty_ok``."""
    if not seeds and not empty_ok:
        return "at least one seed"
    if any(not 0 <= s < SEED_LIMIT for s in seeds):
        return f"seeds {SEED_RANGE}"
    if len(set(seeds)) != len(seeds):
        return "distinct seeds"
    return None


def seeds(cfg: Any, *names: str, empty_ok: bool = False) -> list[Bad]:
    """A :class:`Bad` for each seed field in ``names`` out of range: an int seed outside
    [0, 2**32), a tuple of seeds that fails :func:`seed_problem`."""
    bad = []
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, int):
            if not 0 <= v < SEED_LIMIT:
                bad.append(Bad(n, SEED_RANGE))
        elif problem := seed_problem(v, empty_ok):
            bad.append(Bad(n, problem))
    return bad
