"""What every experiment CLI shares: presets through tyro, help text as written, and one clear
message (no traceback) for a mistake the user can fix: a bad value, a run dir holding another
run, a damaged file, a missing API key.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import tyro
from tyro import _errors, _strings

from sfjax import atomic, device_memory, provenance, runlock
from sfjax.agents.reflectors.base import ReflectorError
from sfjax.atomic import DamagedFile
from sfjax.config_rules import RULES
from sfjax.configcheck import Bad, ConfigError, check_config
from sfjax.models.config import CheckpointUnavailable, UnsupportedCheckpoint
from sfjax.models.weights import CheckpointError
from sfjax.parallel import MainProcessError, failfast


class RunDirTaken(FileExistsError):
    """RUN_DIR cannot take this run: it holds one with another configuration (the message names
    the keys), or it is a file."""


USER_ERRORS = (ConfigError, RunDirTaken, runlock.RunDirInUse, DamagedFile, ReflectorError,
               CheckpointUnavailable, CheckpointError, UnsupportedCheckpoint)
"""A user's mistake or a missing / unusable input: one ``error:`` line and exit status 2."""


def _join_lines(text: str) -> str:
    """Docstrings as help: the lines of a paragraph joined; blank lines, bullets and indented
    lines (examples, tables) kept as written.

    tyro 1.0 joins a docstring's lines only when the next one starts with a letter, before
    dedenting: every continuation line of an indented field docstring (and any starting with
    "(" or "``") broke the help mid-sentence.
    """
    out: list[str] = []
    keep_break = True
    for line in inspect.cleandoc(text).splitlines():
        if not line.strip():
            out.append("\n\n" if out and not out[-1].endswith("\n\n") else "")
            keep_break = True
            continue
        verbatim = line[0].isspace() or re.match(r"[-*•] |\d+[.)] ", line)
        if keep_break or verbatim or (out and out[-1].endswith("\n\n")):
            sep = "" if not out or out[-1].endswith("\n") else "\n"
        else:
            sep = " "
        out.append(sep + (line.rstrip() if verbatim else line.strip()))
        keep_break = bool(verbatim)
    return "".join(out).strip("\n")


_strings.remove_single_line_breaks = _join_lines  # tyro calls it through the module

_DUMMY = ("__tyro-dummy-inner__", "__tyro_dummy_inner__")  # tyro's two spellings
_tyro_value_error = _errors.fire_and_exit_instantiation_failure


def _value_error_named(event, *, arg_fallback, add_help):
    """tyro's "Value error" box for a config that refused its values, titled with the option
    group the user typed (``--kto``) instead of tyro's internal wrapper name
    (``__tyro-dummy-inner__.kto``, what tyro 1.0 prints for a nested ``__post_init__`` error)."""
    if isinstance(arg_fallback, str) and any(d in arg_fallback for d in _DUMMY):
        parts = [p for p in arg_fallback.split(".") if p not in _DUMMY]
        arg_fallback = "--" + ".".join(parts) if parts else "the command line"
    return _tyro_value_error(event, arg_fallback=arg_fallback, add_help=add_help)


_errors.fire_and_exit_instantiation_failure = _value_error_named  # tyro calls it through the module


def checkpoint_with_switch(checkpoint: str, prior: bool, tiny: bool, prefix: str = "") -> list[Bad]:
    """A ``checkpoint`` given together with the behavioural-prior or tiny-Actor switch is
    refused (one Actor: the switch would win and the checkpoint be ignored). ``prefix``: the
    options' path (``model.`` in sf_ranslicing, empty in reflexion_ranslicing)."""
    if not (checkpoint and (prior or tiny)):
        return []
    flag, what = ("prior", "the prior") if prior else ("tiny", "the tiny model")
    why = f"add --{prefix}no-{flag} to load this checkpoint, or --{prefix}checkpoint '' for {what}"
    return [Bad("checkpoint", f"'' with --{prefix}{flag} (one Actor): {why}")]


def parse(presets: dict, args: list[str] | None, description: str | None) -> Any:
    """The preset chosen on the command line with its overrides, every value validated."""
    cfg = tyro.extras.overridable_config_cli(presets, args=args, description=description)
    check_config(cfg, rules=RULES)
    return cfg


INTERRUPTED = ("what the run saved is kept; the same command continues it (the SF loop from "
               "its last phase checkpoint, the RL baselines after their finished algorithms, "
               "Reflexion after its saved trials)")
"""What Ctrl-C prints: every experiment continues a run from what it saved."""


def run_cli(fn: Callable[..., Any], *args,
            memory: Sequence[device_memory.MemoryOption] = (device_memory.POOL,),
            ) -> Any:  # fmt: skip
    """``fn(*args)``; a user's mistake exits with status 2 and its message, no traceback (on
    every process of a multi-process run when process 0 met it in ``on_main_process``);
    Ctrl-C exits with 130 and says how to continue; running out of device memory exits with 1,
    naming the phase (:func:`sfjax.device_memory.during`) and the ``memory`` options that lower
    it (default: JAX's GPU memory pool). The run dirs ``fn`` locked (:func:`make_run_dir`)
    are unlocked when it returns."""
    before = set(runlock.held())
    try:
        return fn(*args)
    except USER_ERRORS as e:
        _exit_with(2, f"error: {e}")
    except MainProcessError as e:  # another process of a multi-process run: 0's error
        if e.kind not in {t.__name__ for t in USER_ERRORS}:
            raise
        _exit_with(2, f"error: {e.detail}")  # process 0's mistake, the same line
    except KeyboardInterrupt:
        _exit_with(130, f"\ninterrupted: {INTERRUPTED}", note="interrupted (Ctrl-C)")
    except Exception as e:
        if not device_memory.is_out_of_memory(e):
            raise
        named = isinstance(e, device_memory.OutOfDeviceMemory)
        where, detail = (e.where, e.detail) if named else (None, device_memory.detail(e))
        advice = device_memory.advice(memory, where)
        _exit_with(1, f"error: out of device memory{f' in {where}' if named else ''}: {detail}",
                   f"{INTERRUPTED}" + (f"\n{advice}" if advice else ""))  # fmt: skip
    finally:
        runlock.release([d for d in runlock.held() if d not in before])


def _exit_with(status: int, line: str, more: str = "", note: str | None = None) -> NoReturn:
    """Print ``line`` (then ``more`` on the next lines) to stderr and exit with ``status``;
    ``line`` less its ``error:`` (or ``note``) is what a multi-process run's other processes
    are told (:func:`sfjax.parallel.failfast.note`)."""
    print(line + (f"\n{more}" if more else ""), file=sys.stderr)
    failfast.note(note or line.removeprefix("error: "))
    sys.exit(status)


# -- RUN_DIR's identity ------------------------------------------------------------------------

REFLECTOR_OPERATIONAL = tuple(
    f"reflector.api.{name}"
    for name in ("api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_base_s",
                 "backoff_max_s", "max_format_retries", "max_tokens_field")
)  # fmt: skip
"""The Reflector API's options that do not change results (its replies are cached by request):
the key's variable name, concurrency, timeouts, retries and the name of the token-budget
field."""


def as_json(cfg) -> dict:
    """A config dataclass as the JSON ``config.json`` holds."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def identity(cfg_json: dict, operational: Sequence[str]) -> dict:
    """The part of a config (as JSON) that changes results: all but the dotted ``operational``
    keys."""
    out = json.loads(json.dumps(cfg_json))
    for dotted in operational:
        holder, leaf = _holder(out, dotted)
        if holder is not None:
            holder.pop(leaf, None)
    return out


def _holder(d: dict, dotted: str) -> tuple[dict | None, str]:
    """The dict that holds the dotted key ``dotted`` in nested ``d`` (None: no such parent)
    and the key's last part."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p) if isinstance(d, dict) else None
    return (d if isinstance(d, dict) else None), leaf


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def _changed(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) for every entry that differs."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _changed(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append((f"{prefix}{k}", x, y))
    return out


def _absent(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys of ``b`` that ``a`` lacks (options added since ``a`` was written)."""
    out = []
    for k in sorted(b):
        if k not in a:
            out.append(f"{prefix}{k}")
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            out += _absent(a[k], b[k], f"{prefix}{k}.")
    return out


def with_values(cfg, values: dict):
    """``cfg`` with the JSON ``values`` (nested dicts) put back into its dataclass fields."""
    changes = {}
    for f in dataclasses.fields(cfg):
        if f.name not in values:
            continue
        cur, new = getattr(cfg, f.name), values[f.name]
        if dataclasses.is_dataclass(cur) and isinstance(new, dict):
            changes[f.name] = with_values(cur, new)
        elif isinstance(cur, tuple) and isinstance(new, list):
            changes[f.name] = tuple(_item(cur, i, v) for i, v in enumerate(new))
        elif isinstance(cur, Path):
            changes[f.name] = Path(new)
        else:
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes)


def _item(cur: tuple, i: int, v):
    """Element ``i`` of a JSON list, typed like the current tuple's elements."""
    like = cur[min(i, len(cur) - 1)] if cur else None
    if dataclasses.is_dataclass(like) and isinstance(v, dict):
        return with_values(like, v)
    return tuple(v) if isinstance(v, list) else v


def with_earlier_values(cfg_json: dict, earlier: Mapping[str, object]) -> dict:
    """``cfg_json`` with each dotted key of ``earlier`` that it lacks set to that value: what a
    run written before the option existed ran with (the option's key present: left alone)."""
    out = json.loads(json.dumps(cfg_json))
    for dotted, value in earlier.items():
        holder, leaf = _holder(out, dotted)
        if holder is not None and leaf not in holder:
            holder[leaf] = value
    return out


def make_run_dir(run_dir: Path) -> None:
    """Create RUN_DIR (and its parents) and lock it for this process (:mod:`sfjax.runlock`:
    a RUN_DIR another process runs in is refused, naming it); one that exists as a file is
    refused (a user error)."""
    from sfjax.parallel import is_main_process

    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            raise RunDirTaken(f"RUN_DIR {run_dir}: {p} is a file, not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # the process that writes
        runlock.hold(run_dir)


def prepare_run_dir(cfg, run_dir: Path, operational: Sequence[str], *,
                    has_run: bool | None = None, what: str = "run",
                    announce: bool = True, earlier: Mapping[str, object] | None = None,
                    noted: Sequence[str] = ()):  # fmt: skip
    """Check RUN_DIR (created if missing) against ``cfg`` (which has a ``resume`` field) and
    write ``config.json``, then append where it runs to ``environment.json``
    (:func:`sfjax.provenance.record_start`); returns (resume?, cfg to run).

    ``has_run``: RUN_DIR holds results of the run its ``config.json`` describes (the caller
    knows what counts; ``None``: a run is there once its ``config.json`` is). A run dir
    holding a run with the same identity (all but the ``operational`` options) is continued
    (``make demo`` twice). One with another identity is refused, naming the keys; with
    ``--resume`` that run is continued with its own values for them (a warning lists them).
    Nothing is ever deleted. ``announce=False``: the caller logs what happens to the run
    instead of "continuing the run". ``earlier``: options added since
    runs were written, with the value every run before them had in effect (the dotted key
    absent from a ``config.json`` is read as that value, :func:`with_earlier_values`); any
    other option a ``config.json`` predates is named. ``noted``: operational options whose
    change from the run's value is logged and recorded in this start's ``environment.json``
    entry (``changed_options``: the memory options, which change results by float rounding).
    """
    make_run_dir(run_dir)
    saved = run_dir / "config.json"
    if has_run is None:
        has_run = saved.exists()
    given = as_json(cfg)
    mine = identity(given, operational)
    before = None
    changed: dict[str, list] = {}
    if saved.exists():
        try:
            raw = with_earlier_values(atomic.read_json(saved, "the run's config"), earlier or {})
            before = identity(raw, operational)
            changed = noted_changes(raw, given, noted) if has_run else {}
        except atomic.DamagedFile as e:
            if has_run and not cfg.resume:
                raise atomic.DamagedFile(
                    f"{e}; pass --resume to continue the {what} in {run_dir} with the options "
                    "given now (config.json is rewritten), or choose a new --run-dir"
                ) from None
    resume = cfg.resume
    log = logging.getLogger(__name__)
    if has_run and before is not None and before != mine:
        added = _absent(before, mine)
        diff = [d for d in _changed(before, mine) if d[0] not in added]
        names = ", ".join(f"{k} ({a!r} in the run, {b!r} now)" for k, a, b in diff[:6])
        names += f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        newer = ", ".join(f"{k} ({_get(mine, k)!r} now)" for k in added[:6])
        newer += f" and {len(added) - 6} more" if len(added) > 6 else ""
        if not cfg.resume:
            parts = [names] if diff else []
            parts += [f"options its config.json predates: {newer}"] if added else []
            raise RunDirTaken(
                f"{run_dir} holds a {what} with another config: {'; '.join(parts)}. Add "
                f"--resume to continue it with its own values, or choose a new --run-dir"
            )
        if diff:
            log.warning("resuming the %s in %s with its own values for: %s", what, run_dir, names)
        if added:
            # the run's own value of an option added since is unknown: say which value runs
            log.warning("the %s in %s was written before the option(s) %s existed: it "
                        "continues with the values given now, which may not be what it ran "
                        "with so far", what, run_dir, newer)
        cfg = with_values(cfg, before)
    if has_run and not resume:
        # Same config: continue (or, if complete, just report) — `make demo` is idempotent.
        if announce:
            log.info("continuing the %s in %s (same config)", what, run_dir)
        resume = True
    for key, (was, now) in changed.items():
        log.warning("%s: %r in the run so far, %r from now on (memory and time only: results "
                    "the same up to float rounding)", key, was, now)  # fmt: skip
    atomic.write_json(saved, as_json(cfg), indent=2)
    # where it ran: commit, versions, CPU / devices, XLA flags (and the noted options it changed)
    provenance.record_start(run_dir, {"changed_options": changed} if changed else None)
    return resume, cfg


def noted_changes(saved: dict, now: dict, noted: Sequence[str]) -> dict[str, list]:
    """``{dotted key: [value in saved, value now]}`` for the ``noted`` keys that differ (a key
    absent from ``saved`` is left out: a config written before it existed)."""
    added = set(_absent(saved, now))
    return {k: [a, b] for k, a, b in _changed(saved, now) if k in noted and k not in added}
