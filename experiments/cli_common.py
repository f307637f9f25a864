"""What every experiment CLI shares: presets through tyro, help text as written, and one clear
message (no traceback) for a mistake the user can fix: a bad value, a run dir holding another
run, a damaged file, a missing API key.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

import tyro
from tyro import _strings

from sfjax.agents.reflectors.base import ReflectorError
from sfjax.atomic import DamagedFile
from sfjax.config_rules import RULES
from sfjax.configcheck import ConfigError, check_config


class RunDirTaken(FileExistsError):
    """RUN_DIR holds a run with another configuration (the message names the keys)."""


USER_ERRORS = (ConfigError, RunDirTaken, DamagedFile, ReflectorError)


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


def parse(presets: dict, args: list[str] | None, description: str | None) -> Any:
    """The preset chosen on the command line with its overrides, every value validated."""
    cfg = tyro.extras.overridable_config_cli(presets, args=args, description=description)
    check_config(cfg, rules=RULES)
    return cfg


def run_cli(fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)``; a user's mistake exits with status 2 and its message, no traceback."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
