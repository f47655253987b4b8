"""``generate`` settings read per row: ``{column: name}`` for temperature, top_p, top_k,
max_new_tokens, stop and seed (``TaskSpec.row_columns``).

A null cell takes the job's value (else the model's); a value of the wrong type or out of
range is that row's ``error``, as a bad prompt is, and the row does not run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lepton_batch.job.generation import GenerationSettings


def _number(low: float, high: float, low_open: bool, what: str) -> Callable:
    def check(value: object) -> float | str:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                (low < value if low_open else low <= value) and value <= high):
            return f"{value!r} is not {what}"
        return float(value)
    return check


def _integer(low: int, what: str) -> Callable:
    def check(value: object) -> int | str:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                value != int(value) or value < low):
            return f"{value!r} is not {what}"
        return int(value)
    return check


def _stop(value: object) -> tuple[str, ...] | str:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        return f"{value!r} is not a stop string or a list of non-empty strings"
    return tuple(values)


CHECKS: dict[str, Callable] = {
    "temperature": _number(0, float("inf"), False, "a temperature >= 0"),
    "top_p": _number(0, 1, True, "a top_p in (0, 1]"),
    "top_k": _integer(0, "a top_k >= 0"),
    "max_new_tokens": _integer(1, "a positive integer"),
    "seed": _integer(-(1 << 63), "an integer seed"),
    "stop": _stop,
}


@dataclass
class RowValues:
    """Per row of a shard (n,): each setting's value (the job's where the column is null)
    in ``values[name]``; ``errors[i]``: why row i's values are unusable, else None."""

    values: dict[str, list]
    errors: list[str | None]

    def take(self, name: str, rows: np.ndarray, dtype: type) -> np.ndarray:
        return np.asarray([self.values[name][i] for i in rows], dtype=dtype)


def row_values(table: pa.Table, settings: GenerationSettings) -> RowValues:
    """Every per-row setting of ``table``'s rows, checked."""
    n = table.num_rows
    default = {"temperature": settings.temperature if settings.do_sample else 0.0,
               "top_p": settings.top_p, "top_k": settings.top_k,
               "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
               "stop": settings.stop}
    values = {name: [value] * n for name, value in default.items()}
    errors: list[str | None] = [None] * n
    for name, column in settings.columns.items():
        check, out = CHECKS[name], values[name]
        for i, cell in enumerate(table[column].to_pylist()):
            if cell is None:
                continue
            got = check(cell)
            if isinstance(got, str):  # the reason it is unusable
                errors[i] = errors[i] or f"{column}: {got}"
            else:
                out[i] = got
    return RowValues(values, errors)
