"""Hyperparameter search for the RL baselines of Table III: the grid, the scores, the choice.

Host-side functions behind experiments/rl_search.py:

* :func:`parse_grid` — ``algo.field=v1,v2,...`` axes, each field checked against the
  algorithm's config dataclass (:class:`~sfjax.baselines.rl.DQNConfig` ...) and each value
  parsed to the field's type; :func:`default_axes` — the learning rate at x1/3, x1, x3 of the
  base config's; :func:`candidates` — the cartesian product of an algorithm's axes, with the base
  config always among them (the comparison is against it).
* :func:`score` — one candidate's validation result; :func:`best` — the winner of an algorithm.
* :func:`table3_flags` — the ``table3.py`` options that give a config (those that differ from
  the defaults).

Statistics. The unit is the training seed, the only independent repeat of training. For a
candidate c trained with seeds n = 1..N and evaluated on validation env seeds s = 1..S, with
U_c[n, s] the eq. 15 utility of one trajectory (Σ_t U_t, :mod:`sfjax.baselines.evaluation`):

    m_c[n] = (1/S) Σ_s U_c[n, s]             (per training seed)
    mean_c = (1/N) Σ_n m_c[n]                 (= the mean over all N x S trajectories)
    95 % interval: mean_c ± t_{0.975, N-1} sd(m_c) / sqrt(N)

Every candidate trains with the same training keys (seed n) and is scored with the same per-step
env keys (seed s), so the comparison with the base config b is paired by training seed and
evaluation seed: d[n] = (1/S) Σ_s (U_c[n, s] - U_b[n, s]), reported as mean(d) with its t interval
over training seeds (:func:`sfjax.baselines.paired.paired_difference`). With one training seed no
interval exists and none is claimed.

Shape legend: N = training seeds, S = validation env seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sfjax.baselines import rl
from sfjax.baselines.paired import paired_difference, t_interval

Axes = dict[str, tuple[Any, ...]]
"""Dotted field of an algorithm's config (``learning_rate``, ``network.activation``) -> values."""

LR_FACTORS = (1 / 3, 1.0, 3.0)
"""The default axis: the base learning rate times these."""
SCALARS = (bool, int, float, str)
CONFIG_TYPES = {"dqn": rl.DQNConfig, "ppo": rl.PPOConfig, "sac": rl.SACConfig}


def searchable_fields(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted name -> type of every scalar field of the config dataclass ``cls`` (nested
    dataclasses included; tuples are not searchable)."""
    out: dict[str, type] = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(searchable_fields(tp, f"{prefix}{name}."))
        elif tp in SCALARS:
            out[f"{prefix}{name}"] = tp
    return out


def _all_fields(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out += _all_fields(tp, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _parse_value(text: str, tp: type) -> Any:
    t = text.strip()
    if tp is bool:
        if t.lower() in ("true", "false"):
            return t.lower() == "true"
        raise ValueError(f"{text!r} is not a bool (true or false)")
    if tp is str:
        if not t:
            raise ValueError("an empty value")
        return t
    try:
        value = tp(t)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an int' if tp is int else 'a float'}") from None
    if tp is float and not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def parse_grid(specs: Sequence[str], algos: Sequence[str] = rl.ALGOS) -> dict[str, Axes]:
    """``["dqn.learning_rate=1e-4,3e-4", "ppo.ent_coef=0,0.01"]`` -> ``{"dqn":
    {"learning_rate": (1e-4, 3e-4)}, "ppo": {"ent_coef": (0.0, 0.01)}}``.

    Fields may be spelt with ``-`` (as the CLI spells options) or ``_``; nested fields are dotted
    (``dqn.network.activation=relu,swish``). Raises ``ValueError`` naming the bad axis: an
    algorithm not among ``algos``, a field its config lacks (the valid ones are listed), a value
    not of the field's type, a repeated value or axis."""
    out: dict[str, Axes] = {}
    for spec in specs:
        key, eq, values = spec.partition("=")
        algo, _, field = key.strip().partition(".")
        field = field.replace("-", "_")
        if not eq or not field:
            raise ValueError(
                f"grid axis {spec!r}: expected algo.field=v1,v2,... "
                "(e.g. dqn.learning_rate=1e-4,3e-4,1e-3)"
            )
        if algo not in CONFIG_TYPES:
            raise ValueError(f"grid axis {spec!r}: unknown algorithm {algo!r}; choose among "
                             f"{', '.join(CONFIG_TYPES)}")  # fmt: skip
        if algo not in algos:
            raise ValueError(f"grid axis {spec!r}: {algo} is not searched (--rl.algos "
                             f"{' '.join(algos)}); add it there or drop the axis")  # fmt: skip
        cls = CONFIG_TYPES[algo]
        fields = searchable_fields(cls)
        if field not in fields:
            if field in _all_fields(cls):
                raise ValueError(f"grid axis {spec!r}: {field} is a tuple, not searchable here; "
                                 f"set it with --rl.{algo}.{field.replace('_', '-')}")  # fmt: skip
            raise ValueError(
                f"grid axis {spec!r}: {cls.__name__} has no field {field!r}; its fields: "
                f"{', '.join(fields)}"
            )
        name = f"{algo}.{field}"
        if field in out.get(algo, {}):
            raise ValueError(f"grid axis {name} is given twice; give its values once")
        try:
            parsed = tuple(_parse_value(v, fields[field]) for v in values.split(","))
        except ValueError as e:
            raise ValueError(f"grid axis {spec!r}: {e}") from None
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"grid axis {spec!r}: a value is repeated")
        out.setdefault(algo, {})[field] = parsed
    return out


def _round(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def default_axes(base: rl.AlgoConfig) -> Axes:
    """The learning rate at x1/3, x1, x3 of ``base``'s (3 significant digits: 3e-4 gives
    1e-4, 3e-4, 9e-4)."""
    return {"learning_rate": tuple(_round(base.learning_rate * f) for f in LR_FACTORS)}


def get_field(cfg: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def with_field(cfg: Any, dotted: str, value: Any) -> Any:
    """``cfg`` with the (possibly nested) field ``dotted`` set to ``value``."""
    head, _, rest = dotted.partition(".")
    if rest:
        value = with_field(getattr(cfg, head), rest, value)
    return dataclasses.replace(cfg, **{head: value})


@dataclass(frozen=True)
class Candidate:
    """One configuration of an algorithm in the search."""

    algo: str
    config: rl.AlgoConfig
    axes: Mapping[str, Any]
    """Its value on every searched axis."""
    is_default: bool
    """It is the base config (the preset's / ``--rl.<algo>.*`` values)."""

    @property
    def label(self) -> str:
        text = " ".join(f"{k}={v!r}" for k, v in self.axes.items())
        return f"{text} (default)" if self.is_default else text

    @property
    def id(self) -> str:
        """File-name-safe name, unique within the search."""
        text = "_".join(f"{k}={v}" for k, v in self.axes.items())
        return re.sub(r"[^A-Za-z0-9.=_+-]", "_", f"{self.algo}-{text}")


def candidates(algo: str, base: rl.AlgoConfig, axes: Axes) -> list[Candidate]:
    """The cartesian product of ``axes`` over ``base`` (in the order given); ``base`` is one of
    them, put first when the product does not hold it."""
    if not axes:
        raise ValueError(f"no axis to search for {algo}")
    names = list(axes)
    out, seen = [], False
    for values in itertools.product(*(axes[n] for n in names)):
        cfg = base
        for n, v in zip(names, values):
            cfg = with_field(cfg, n, v)
        is_default = cfg == base
        seen |= is_default
        out.append(Candidate(algo, cfg, dict(zip(names, values)), is_default))
    if not seen:
        out.insert(0, Candidate(algo, base, {n: get_field(base, n) for n in names}, True))
    return out


def score(per_episode: Mapping[str, np.ndarray], default_utility_NS: np.ndarray | None) -> dict:
    """One candidate's result from its per-trajectory metrics (each [N, S]; keys of
    :meth:`~sfjax.baselines.evaluation.Rollouts.per_episode`) and the base config's utility
    [N, S] on the same training and validation seeds (module docstring)."""
    u_NS = np.asarray(per_episode["utility"], np.float64)
    if u_NS.ndim != 2:
        raise ValueError(
            f"per-episode utility must be [training seeds, eval seeds], got {u_NS.shape}"
        )
    d_NS = None if default_utility_NS is None else np.asarray(default_utility_NS, np.float64)
    if d_NS is not None and d_NS.shape != u_NS.shape:
        raise ValueError(f"unpaired: the default's utility is {d_NS.shape}, this candidate's "
                         f"{u_NS.shape}")  # fmt: skip
    m_N = u_NS.mean(-1)
    mean, lo, hi = t_interval(m_N)  # over training seeds, df = N - 1
    others = {k: float(np.mean(per_episode[k])) for k in ("mean_se", "reconfigurations",
                                                          "violations")}  # fmt: skip
    return {
        "utility": mean,
        "utility_ci": None if lo is None else [lo, hi],
        "per_seed_utility": m_N.tolist(),
        **others,
        "vs_default": None if d_NS is None else paired_difference(d_NS.mean(-1), m_N),
    }


def best(utilities: Sequence[float], default_index: int) -> int:
    """Index of the highest mean utility; a tie goes to the default config, then to the first."""
    top = max(utilities)
    if utilities[default_index] == top:
        return default_index
    return next(i for i, u in enumerate(utilities) if u == top)


def _flag_value(v: Any) -> str:
    if isinstance(v, tuple):
        return " ".join(_flag_value(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)


def table3_flags(
    algo: str, cfg: rl.AlgoConfig, reference: rl.AlgoConfig | None = None
) -> list[str]:
    """The ``table3.py`` / ``rl_baselines.py`` options (``--rl.dqn.learning-rate 0.001``) that
    turn ``reference`` (default: the config class's defaults, which both scripts' ``paper``
    presets use) into ``cfg``: one per differing field."""
    reference = type(cfg)() if reference is None else reference
    out = []

    def walk(a, b, path):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            name = f"{path}{f.name.replace('_', '-')}"
            if dataclasses.is_dataclass(x):
                walk(x, y, f"{name}.")
            elif x != y:
                if isinstance(x, bool):
                    *parent, leaf = name.rsplit(".", 1)
                    out.append(name if x else ".".join([*parent, f"no-{leaf}"]))
                else:
                    out.append(f"{name} {_flag_value(x)}")

    walk(cfg, reference, f"--rl.{algo}.")
    return out


def time_left(walls: Mapping[str, Sequence[float]], remaining: Sequence[str]) -> float | None:
    """Estimated seconds for the ``remaining`` candidates (their algorithm names): each at the
    mean wall time of its algorithm's candidates trained so far, or of all of them when its
    algorithm has none yet; None before any finished."""
    every = [w for ws in walls.values() for w in ws]
    if not every:
        return None
    return sum(float(np.mean(walls.get(a) or every)) for a in remaining)


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_seeds(seeds: Sequence[int]) -> str:
    """``0-15`` for a run of consecutive seeds, else ``0, 2, 5``."""
    s = sorted(seeds)
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ", ".join(str(x) for x in s)
