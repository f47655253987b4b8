"""Turn the input text column into clean Python strings, recording every bad row.

A row is used as it is, control characters included (the tokenizer drops or maps them), as
long as it has at least one visible character; a row of only whitespace and/or control or
zero-width characters is an error, since the model would see nothing but special tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lepton_batch.job.settings import Settings

STRING_TYPES = (pa.string(), pa.large_string())
BINARY_TYPES = (pa.binary(), pa.large_binary())
# One visible character: not whitespace, not a C0/C1 control, not a zero-width format
# character. ``search`` stops at the first match, so ordinary text costs one step.
_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\u200b-\u200f\u2060\ufeff]")


@dataclass(frozen=True)
class PreparedText:
    """``texts``: the usable rows; ``valid``: (k,) int64 positions of those rows in the shard;
    ``errors``: (n,) Arrow string array, null for usable rows, the reason otherwise."""

    texts: list[str]
    valid: np.ndarray
    errors: pa.Array


def check_value(value: object) -> tuple[str | None, str | None]:
    """(text, None) for a usable row, (None, reason) for a bad one."""
    if value is None:
        return None, "null text"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"invalid UTF-8 at byte {exc.start}"
    if not isinstance(value, str):
        return None, f"text is {type(value).__name__}, not a string"
    if not value.strip():
        return None, "empty text"
    if _VISIBLE.search(value) is None:
        return None, "empty text (only whitespace or control characters)"
    return value, None


def prepare_text(column: pa.ChunkedArray | pa.Array) -> PreparedText:
    """Validate every row of a text column; never raises for a bad row.

    A column of a non-text type (a file whose schema drifted) marks every row as an error
    rather than failing the shard.
    """
    if column.type not in STRING_TYPES + BINARY_TYPES:
        reason = f"text column is {column.type}, not a string"
        errors = pa.array([reason] * len(column), pa.string())
        return PreparedText([], np.zeros(0, dtype=np.int64), errors)
    texts, valid, errors = [], [], []
    for i, value in enumerate(column.to_pylist()):
        text, error = check_value(value)
        errors.append(error)
        if text is not None:
            texts.append(text)
            valid.append(i)
    return PreparedText(texts, np.asarray(valid, dtype=np.int64), pa.array(errors, pa.string()))


def encoder_texts(column: pa.ChunkedArray | pa.Array,
                  settings: Settings) -> tuple[list[str], PreparedText]:
    """The usable rows of ``column`` as the encoder sees them (``settings.apply``)."""
    prep = prepare_text(column)
    return settings.apply(prep.texts), prep
