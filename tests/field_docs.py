"""The docstring under a dataclass field, as tyro shows it in ``--help``:
``field_doc(SACConfig, "safe_log_probs")``."""

from __future__ import annotations

import ast
import inspect
import textwrap


def field_doc(cls, name: str) -> str:
    """The docstring under field ``name`` of dataclass ``cls``; AssertionError when it has none."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for stmt, doc in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and stmt.target.id == name:
            return doc.value.value
    raise AssertionError(f"{cls.__name__}.{name} has no docstring")
