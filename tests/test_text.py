"""Bad rows are recorded, never raised: null, empty, invalid UTF-8, wrong type."""

from __future__ import annotations

import pyarrow as pa

from lepton_batch.pipelines import prepare_text


def test_string_column_bad_rows():
    prep = prepare_text(pa.chunked_array([["ok", None, "", "   "], ["fine"]]))
    assert prep.texts == ["ok", "fine"]
    assert prep.valid.tolist() == [0, 4]
    assert prep.errors.to_pylist() == [None, "null text", "empty text", "empty text", None]


def test_binary_column_with_invalid_utf8():
    column = pa.array([b"caf\xc3\xa9", b"\xff\xfe bad", None], pa.binary())
    prep = prepare_text(column)
    assert prep.texts == ["café"]
    assert prep.errors.to_pylist()[1].startswith("invalid UTF-8 at byte 0")
    assert prep.errors.to_pylist()[2] == "null text"


def test_wrong_column_type_marks_every_row():
    prep = prepare_text(pa.array([1, 2, 3], pa.int64()))
    assert prep.texts == [] and len(prep.valid) == 0
    assert prep.errors.to_pylist() == ["text column is int64, not a string"] * 3


def test_control_characters():
    column = pa.array(["\x00\x07\n", "\u200b\ufeff ", "bell\x07 inside", "\x1b[31mred"])
    prep = prepare_text(column)
    only = "empty text (only whitespace or control characters)"
    assert prep.errors.to_pylist() == [only, only, None, None]
    assert prep.texts == ["bell\x07 inside", "\x1b[31mred"]  # processed as they are
