"""``task.response_format`` for ``generate``: structured output, and the columns it types.

Three shapes, the OpenAI API's and vLLM's spellings: ``{type: json_schema, schema: {...}}``
(or ``schema_path``, or OpenAI's ``json_schema: {name, schema}``), ``{type: choice,
choices: [...]}`` and ``{type: regex, pattern: ...}``. The engine constrains decoding to
them token by token (``engine/grammar.py``); this module is the job side: the checks, the
grammar text, and for a JSON schema the Arrow type of the answer, so the output contract
shows typed columns before any model loads.

A JSON schema maps to Arrow as a warehouse reads it: object -> struct (fields in
``properties`` order; a property not in ``required`` is nullable), array -> list,
string/integer/number/boolean -> string/int64/float64/bool, enum/const -> the type of their
values. A top-level object lands as one column per property; any other top level in one
column named by ``response_format.column`` (which also puts an object in one struct column).
Keywords that would leave a column untyped (``anyOf`` other than "X or null",
``additionalProperties`` other than false, ``$ref`` cycles, ``patternProperties`` ...) are
refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Keywords that constrain values without changing their type: the grammar enforces them.
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$schema", "$id",
                "deprecated", "readOnly", "writeOnly"}
_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
}
_ARROW = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
          "boolean": pa.bool_()}
_JSON_TYPE = {str: "string", bool: "boolean", int: "integer", float: "number"}


class ResponseFormat(BaseModel):
    """What every generation must be: JSON for a schema, one of ``choices``, or a match of
    ``pattern``. ``column``: the one output column a JSON answer lands in."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["json_schema", "choice", "regex"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    schema_path: str | None = None
    json_schema: dict[str, Any] | None = None  # OpenAI's {name, schema, strict}
    choices: list[str] | None = None
    pattern: str | None = None
    column: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        given = {name for name in ("schema_", "schema_path", "json_schema", "choices",
                                   "pattern", "column") if getattr(self, name) is not None}
        wanted = {"json_schema": {"schema_", "schema_path", "json_schema"},
                  "choice": {"choices"}, "regex": {"pattern"}}[self.type]
        spelled = {"schema_": "schema"}
        names = sorted(spelled.get(g, g) for g in given - wanted - {"column"})
        if names:
            verb = "does" if len(names) == 1 else "do"
            raise ValueError(f"{', '.join(names)} {verb} not apply to type: {self.type}")
        if self.type == "json_schema":
            sources = given & wanted
            if len(sources) != 1:
                raise ValueError("type: json_schema needs exactly one of schema (inline), "
                                 "schema_path (a JSON file) or json_schema ({name, schema})")
            fields(self.schema())  # refuses what cannot be typed, naming the keyword
        elif self.column is not None:
            raise ValueError(f"column applies to type: json_schema; a {self.type} answer "
                             "is the generation column itself")
        if self.type == "choice":
            if not self.choices or any(not c for c in self.choices):
                raise ValueError("choices needs at least one non-empty string")
            if len(set(self.choices)) != len(self.choices):
                raise ValueError("choices has duplicates")
        if self.type == "regex" and not self.pattern:
            raise ValueError("regex needs a non-empty pattern")
        grammar_text(self.resolved())
        return self

    def schema(self) -> dict[str, Any]:
        """The JSON schema (read from ``schema_path`` when given). Raises ValueError."""
        if self.schema_ is not None:
            return self.schema_
        if self.json_schema is not None:
            schema = self.json_schema.get("schema")
            if not isinstance(schema, dict):
                raise ValueError("json_schema.schema must be a JSON schema object")
            return schema
        path = Path(str(self.schema_path))
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"schema_path: cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"schema_path: {path} is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"schema_path: {path} must hold a JSON object")
        return schema

    def resolved(self) -> dict[str, Any]:
        """The format with the schema inline: what the fingerprint, the file metadata and
        the workers get (a worker need not see ``schema_path``)."""
        if self.type == "choice":
            return {"type": "choice", "choices": list(self.choices or [])}
        if self.type == "regex":
            return {"type": "regex", "pattern": self.pattern}
        out: dict[str, Any] = {"type": "json_schema", "schema": self.schema()}
        if self.column is not None:
            out["column"] = self.column
        return out


def grammar_text(resolved: dict[str, Any]) -> str:
    """The grammar the engine constrains decoding with (llguidance's text): the JSON schema
    with every object closed (no key without a column), the regex, or the choices as a Lark
    grammar of literals. Raises ValueError when llguidance refuses it (a bad regex)."""
    import llguidance

    kind = resolved["type"]
    if kind == "json_schema":
        # Compact JSON: no whitespace between tokens for the model to spend steps on.
        schema = {**_closed(resolved["schema"]), "x-guidance": {"whitespace_flexible": False}}
        text = llguidance.LLMatcher.grammar_from_json_schema(schema)
    elif kind == "regex":
        text = llguidance.LLMatcher.grammar_from_regex(resolved["pattern"])
    else:
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False)
                                  for c in resolved["choices"])
        text = llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    problem = llguidance.LLMatcher.validate_grammar(text, None)
    if problem:
        raise ValueError(f"the grammar engine refuses it: {' '.join(problem.split())}")
    return text


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that has
    properties (OpenAI's strict mode requires it; here a key beyond the schema would have no
    column)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def fields(resolved_or_schema: dict[str, Any], column: str | None = None) -> list[pa.Field]:
    """The typed output fields of a JSON-schema answer (all nullable at the top: a row
    whose answer does not parse has nulls there). Raises ValueError naming the keyword."""
    schema = resolved_or_schema
    defs = {**schema.get("$defs", {}), **schema.get("definitions", {})}
    top = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    arrow = _type(top, defs, "schema", ())
    if column is not None:
        return [pa.field(column, arrow)]
    if not pa.types.is_struct(arrow):
        raise ValueError("the schema's top level is not an object: name the output column it "
                         "lands in with response_format.column")
    return [pa.field(f.name, f.type) for f in arrow]


def _type(schema: Any, defs: dict[str, Any], where: str, seen: tuple[str, ...]) -> pa.DataType:
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a schema must be an object, got {json.dumps(schema)}")
    if "$ref" in schema:
        ref = schema["$ref"]
        name = ref.rsplit("/", 1)[-1]
        if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")) \
                or name not in defs:
            raise ValueError(f"{where}: $ref {ref!r} must point into this schema's $defs")
        if name in seen:
            raise ValueError(f"{where}: $ref {ref!r} is recursive; a recursive schema has no "
                             "fixed column type")
        return _type(defs[name], defs, where, (*seen, name))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = schema[key]
            rest = [s for s in options if s != {"type": "null"}]
            if len(rest) != 1 or len(options) != 2:
                raise ValueError(f"{where}: {key} is supported only as 'X or null'; a union of "
                                 "types has no single column type")
            return _type({**{k: v for k, v in schema.items() if k != key}, **rest[0]},
                         defs, where, seen)
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values is not None:
        kinds = {_JSON_TYPE.get(type(v)) for v in values if v is not None}
        kinds = {"number"} if kinds == {"integer", "number"} else kinds
        if len(kinds) != 1 or None in kinds or not values:
            raise ValueError(f"{where}: enum/const values must share one of the types "
                             f"string, integer, number, boolean (got {json.dumps(values)})")
        return _ARROW[kinds.pop()]
    kind = schema.get("type")
    if isinstance(kind, list):
        rest = [k for k in kind if k != "null"]
        if len(rest) != 1:
            raise ValueError(f"{where}: type {json.dumps(kind)}: a union of types has no "
                             "single column type")
        kind = rest[0]
    if kind not in _BY_TYPE:
        raise ValueError(f"{where}: type must be one of {', '.join(_BY_TYPE)} "
                         f"(got {json.dumps(kind)})")
    unknown = sorted(set(schema) - _ANNOTATIONS - _BY_TYPE[kind] - {"type"})
    if unknown:
        raise ValueError(f"{where}: {', '.join(unknown)} is not supported for type {kind} "
                         "(structured output types every value into a column)")
    if kind == "array":
        if "items" not in schema:
            raise ValueError(f"{where}: an array needs items (the type of its elements)")
        return pa.list_(_type(schema["items"], defs, f"{where}.items", seen))
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            raise ValueError(f"{where}: an object needs properties (a free-form object has no "
                             "column type)")
        if schema.get("additionalProperties", False) is not False:
            raise ValueError(f"{where}: additionalProperties must be false (extra keys would "
                             "have no column)")
        required = set(schema.get("required", []))
        missing = sorted(required - set(props))
        if missing:
            raise ValueError(f"{where}: required names {', '.join(missing)}, which are not "
                             "in properties")
        return pa.struct([pa.field(name, _type(sub, defs, f"{where}.properties.{name}", seen),
                                   nullable=name not in required or _nullable(sub))
                          for name, sub in props.items()])
    return _ARROW[kind]


def _nullable(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return (isinstance(kind, list) and "null" in kind) or any(
        {"type": "null"} in schema.get(k, []) for k in ("anyOf", "oneOf"))


def typed_columns(texts: list[str | None], resolved: dict[str, Any],
                  out_fields: list[pa.Field]) -> tuple[dict[str, pa.Array], list[str | None]]:
    """Parse each generation (None: a row that did not run) into ``out_fields``' columns.
    Returns the columns and, per row, why its answer could not be read (else None)."""
    errors: list[str | None] = [None] * len(texts)
    values: list[Any] = []
    for i, text in enumerate(texts):
        value = None
        if text is not None:
            try:
                value = json.loads(text)
            except ValueError as exc:
                errors[i] = f"generation is not valid JSON ({exc.msg} at character {exc.pos})"
        values.append(value)
    if "column" in resolved:
        rows = {out_fields[0].name: values}
    else:
        rows = {f.name: [v.get(f.name) if isinstance(v, dict) else None for v in values]
                for f in out_fields}
    for f in out_fields:  # a value Arrow cannot hold (an integer over int64): that row
        try:
            pa.array(rows[f.name], f.type)
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass
        for i, v in enumerate(rows[f.name]):
            if v is not None and errors[i] is None:
                try:
                    pa.array([v], f.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    errors[i] = f"{f.name}: {json.dumps(v)} does not fit {f.type}"
    # A row that failed anywhere has nulls in every typed column.
    columns = {f.name: pa.array([None if errors[i] else v for i, v in enumerate(rows[f.name])],
                                f.type) for f in out_fields}
    return columns, errors
