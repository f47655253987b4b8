"""``generate`` with ``task.response_format`` (JSON schema, choices, regex) and settings read
per row from columns, on a tiny random Llama: the grammar holds whatever the weights say."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import invoke_cli, sample_texts, write_corpus, write_job
from transformers import AutoModelForCausalLM

from lepton_batch.engine import EngineConfig, Tokenized
from lepton_batch.engine.continuous import GenerateStats, RowSampling, Sampling, generate
from lepton_batch.engine.decoder import Decoder
from lepton_batch.job.spec import JobSpecError, load_job
from lepton_batch.job.structured import ResponseFormat, fields, grammar_text
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job

SCHEMA = {
    "type": "object",
    "properties": {
        "company": {"type": "string", "maxLength": 12},
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "flag": {"type": "boolean"},
    },
    "required": ["company", "sentiment", "score"],
}


def _decoder(model_dir) -> Decoder:
    return Decoder(EngineConfig(str(model_dir), "causal_lm", dtype="float32", device="cpu",
                                max_length=256))


def _prompts(dec: Decoder, n: int) -> list[list[int]]:
    ids = dec.tokenizer(sample_texts(n), verbose=False)["input_ids"]
    return [row[: 4 + (i * 11) % 60] for i, row in enumerate(ids)]


def _grammar(fmt: dict) -> str:
    return grammar_text(ResponseFormat.model_validate(fmt).resolved())


def _job(tmp_path, model_dir, task, rows_per_shard=20, **inp):
    path = write_job(
        tmp_path / "job.yaml", name="structured",
        input={"path": str(tmp_path / "in"), "text_column": "text", "id_column": "id",
               "rows_per_shard": rows_per_shard, **inp},
        model={"path": str(model_dir), "dtype": "float32"}, task=task,
        engine={"max_num_seqs": 6, "max_tokens_per_batch": 512},
        output={"path": str(tmp_path / "out")},
        cluster={"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"})
    return path


def _read(plan) -> pl.DataFrame:
    return pl.read_parquet(sorted(plan.output_root.glob("run_date=*/*.parquet"))).sort("id")


def test_json_schema_job_writes_valid_json_and_typed_columns(tmp_path, tiny_llama):
    write_corpus(tmp_path / "in", n_files=2, rows=20)
    path = _job(tmp_path, tiny_llama, {
        "kind": "generate", "prompt": "Extract as JSON: {text}\n", "max_new_tokens": 80,
        "response_format": {"type": "json_schema", "schema": SCHEMA}})
    code, out = invoke_cli("validate", path)
    assert code == 0, out
    assert re.search(r"tags\s+│ list<item: string>", out) and re.search(r"score\s+│ int64", out)
    assert '"properties": ["company", "sentiment", "score", "tags", "flag"]' in out, out
    plan = make_plan(load_job(path))
    assert run_job(plan).ok
    df = _read(plan)
    ran = df.filter(pl.col("generation").is_not_null())
    assert ran.height == 34  # 40 rows less the null, empty and blank row of each file
    schema = pq.read_schema(next(plan.output_root.glob("run_date=*/*.parquet")))
    assert schema.field("score").type == pa.int64()
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("flag").type == pa.bool_()
    contract = json.loads((plan.output_root / "_schema.json").read_text())
    assert "sentiment" in json.dumps(contract)
    valid = 0
    for row in ran.iter_rows(named=True):
        if row["finish_reason"] == "length":  # cut short: the text stays, an error, nulls
            assert row["error"].startswith("generation is not valid JSON"), row
            assert row["company"] is None and row["score"] is None
            continue
        assert row["finish_reason"] == "stop" and row["error"] is None, row
        answer = json.loads(row["generation"])
        jsonschema.validate(answer, SCHEMA)
        assert (row["company"], row["sentiment"], row["score"]) == (
            answer["company"], answer["sentiment"], answer["score"])
        assert row["tags"] == answer.get("tags") and row["flag"] == answer.get("flag")
        valid += 1
    assert valid >= 30, f"{valid} of {ran.height} rows finished their JSON"


def test_a_cut_answer_is_an_error_row_that_keeps_its_text(tmp_path, tiny_llama):
    write_corpus(tmp_path / "in", n_files=1, rows=10, bad=False)
    plan = make_plan(load_job(_job(tmp_path, tiny_llama, {
        "kind": "generate", "max_new_tokens": 5,
        "response_format": {"type": "json_schema", "schema": SCHEMA}})))
    assert run_job(plan).ok
    df = _read(plan)
    assert (df["finish_reason"] == "length").all()
    assert df["generation"].str.starts_with('{"').all()
    assert df["error"].str.contains("not valid JSON").all()
    assert df["error"].str.ends_with("finish_reason length").all()
    assert df["sentiment"].null_count() == df.height


@pytest.mark.parametrize("fmt, check", [
    ({"type": "choice", "choices": ["positive", "negative", "not \"sure\""]},
     lambda text: text in ("positive", "negative", 'not "sure"')),
    ({"type": "regex", "pattern": r"[A-Z]{2}-\d{3}"},
     lambda text: re.fullmatch(r"[A-Z]{2}-\d{3}", text) is not None),
])
def test_choice_and_regex_hold_for_every_row(tiny_llama, fmt, check):
    dec = _decoder(tiny_llama)
    ids = _prompts(dec, 16)
    tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
    out = generate(dec, tok, np.full(len(ids), 20), np.zeros(len(ids), dtype=np.int64),
                   Sampling(), [], 5, None, 512, GenerateStats(),
                   grammars=[_grammar(fmt)] * len(ids))
    texts = dec.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
    assert all(check(t) for t in texts), texts
    assert set(out.finish) == {"stop"}


def _unbatched(model_dir, dec: Decoder, ids: list[list[int]], text: str,
               max_new: int) -> list[list[int]]:
    """The reference: the model one row at a time, each step's argmax over the tokens the
    grammar allows (llguidance directly), until the grammar is complete."""
    import llguidance
    import llguidance.hf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lltok = llguidance.hf.from_tokenizer(dec.tokenizer, n_vocab=dec.vocab_size,
                                         eos_token=dec.eos_ids())
    out = []
    with torch.inference_mode():
        for row in ids:
            matcher, seq, new = llguidance.LLMatcher(lltok, text), list(row), []
            while len(new) < max_new and not matcher.is_stopped():
                logits = model(torch.tensor([seq])).logits[0, -1]
                bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8),
                                     bitorder="little")[: len(logits)]
                logits[torch.from_numpy(bits == 0)] = float("-inf")
                token = int(logits.argmax())
                assert matcher.consume_token(token)
                seq.append(token)
                new.append(token)
            out.append(new)
    return out


def test_greedy_structured_output_equals_an_unbatched_reference(tiny_llama):
    dec = _decoder(tiny_llama)
    ids = _prompts(dec, 12)
    text = _grammar({"type": "json_schema", "schema": SCHEMA})
    tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
    out = generate(dec, tok, np.full(len(ids), 60), np.zeros(len(ids), dtype=np.int64),
                   Sampling(), [], 4, None, 256, GenerateStats(), grammars=[text] * len(ids))
    assert out.tokens == _unbatched(tiny_llama, dec, ids, text, 60)


def test_a_grammar_applies_only_to_its_rows(tiny_llama):
    dec = _decoder(tiny_llama)
    ids = _prompts(dec, 8)
    tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
    args = (dec, tok, np.full(len(ids), 12), np.zeros(len(ids), dtype=np.int64), Sampling(),
            [], 3, None, 256)
    free = generate(*args, GenerateStats())
    mixed = generate(*args, GenerateStats(), grammars=[
        _grammar({"type": "choice", "choices": ["yes", "no"]}) if i % 2 else None
        for i in range(len(ids))])
    for i, tokens in enumerate(mixed.tokens):
        if i % 2:
            assert dec.tokenizer.decode(tokens, skip_special_tokens=True) in ("yes", "no")
        else:
            assert tokens == free.tokens[i]


def test_per_row_sampling_is_the_same_in_any_batch(tiny_llama):
    dec = _decoder(tiny_llama)
    ids = _prompts(dec, 10)
    n = len(ids)
    rows = RowSampling(temperature=np.array([0.0, 0.7, 1.3, 0.0, 1.0] * 2),
                       top_k=np.array([0, 5, 0, 3, 40] * 2),
                       top_p=np.array([1.0, 0.9, 0.5, 1.0, 1.0] * 2))
    seeds = np.arange(n, dtype=np.int64) * 7919
    max_new = np.full(n, 10)
    sampling = Sampling(do_sample=True)

    def run(order: np.ndarray, slots: int) -> list[list[int]]:
        tok = Tokenized.from_lists([ids[i] for i in order], np.zeros(n, dtype=bool))
        sub = RowSampling(rows.temperature[order], rows.top_k[order], rows.top_p[order])
        out = generate(dec, tok, max_new[order], seeds[order], sampling, [], slots, None, 256,
                       GenerateStats(), rows=sub)
        back = [None] * n
        for j, i in enumerate(order):
            back[i] = out.tokens[j]
        return back

    first = run(np.arange(n), n)
    assert first == run(np.random.default_rng(1).permutation(n), 3)
    # A row with one job-wide setting draws what it draws under that setting.
    tok = Tokenized.from_lists(ids, np.zeros(n, dtype=bool))
    same = generate(dec, tok, max_new, seeds, Sampling(do_sample=True, temperature=0.7,
                                                        top_k=5, top_p=0.9),
                    [], n, None, 256, GenerateStats())
    assert same.tokens[1] == first[1] and same.tokens[6] == first[6]
    greedy = generate(dec, tok, max_new, seeds, Sampling(), [], n, None, 256, GenerateStats())
    assert greedy.tokens[0] == first[0] and greedy.tokens[3] == first[3]


def test_settings_from_columns_and_bad_cells_are_row_errors(tmp_path, tiny_llama):
    write_corpus(tmp_path / "in", n_files=1, rows=16, bad=False)
    table = pq.read_table(tmp_path / "in" / "corpus-0.parquet")
    n = table.num_rows
    temps = [0.0 if i % 2 else None for i in range(n)]
    temps[5] = -1.0
    stops = [None] * n
    stops[2], stops[4] = ["e"], 7
    budget = [3 + i for i in range(n)]
    budget[6] = 0
    table = table.append_column("temp", pa.array(temps)).append_column(
        "stops", pa.array([json.dumps(s) if isinstance(s, list) else None for s in stops])
    ).append_column("budget", pa.array(budget))
    # A list column for stop strings; one cell of the wrong type.
    table = table.set_column(table.schema.get_field_index("stops"), "stops", pa.array(
        [s if isinstance(s, list) else None for s in stops], pa.list_(pa.string())))
    pq.write_table(table, tmp_path / "in" / "corpus-0.parquet")
    plan = make_plan(load_job(_job(tmp_path, tiny_llama, {
        "kind": "generate", "temperature": {"column": "temp"}, "stop": {"column": "stops"},
        "max_new_tokens": {"column": "budget"}, "seed": 3})))
    assert run_job(plan).ok
    df = _read(plan)
    by = {r["id"]: r for r in df.iter_rows(named=True)}
    assert by[5]["error"] == "temp: -1.0 is not a temperature >= 0"
    assert by[6]["error"] == "budget: 0 is not a positive integer"
    assert by[0]["generated_tokens"] <= 3 and by[9]["generated_tokens"] <= 12
    assert "e" not in by[2]["generation"]
    assert df.filter(pl.col("error").is_null()).height == n - 2
    # Greedy rows (temperature 0) are what a greedy job writes for them.
    greedy = make_plan(load_job(_job(tmp_path, tiny_llama, {
        "kind": "generate", "temperature": 0, "max_new_tokens": {"column": "budget"}}),
        ["output.path=" + str(tmp_path / "greedy")]))
    assert run_job(greedy).ok
    other = {r["id"]: r for r in _read(greedy).iter_rows(named=True)}
    for i in (1, 3, 7, 9, 11):
        assert by[i]["generation"] == other[i]["generation"], i


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_schema", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "patternProperties": {}}}}},
     "schema.properties.a: patternProperties is not supported for type string"),
    ({"type": "json_schema", "schema": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
     "anyOf is supported only as 'X or null'"),
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {}},
                                        "additionalProperties": True}},
     "additionalProperties must be false"),
    ({"type": "json_schema", "schema": {"type": "array", "items": {"type": "integer"}}},
     "name the output column it lands in with response_format.column"),
    ({"type": "json_schema", "schema_path": "no/such.json"}, "schema_path: cannot read"),
    ({"type": "regex", "pattern": "(ab"}, "the grammar engine refuses it"),
    ({"type": "choice", "choices": ["a", "a"]}, "choices has duplicates"),
    ({"type": "choice", "choices": ["a"], "pattern": "x"},
     "pattern does not apply to type: choice"),
    ({"type": "json_schema", "schema": {"type": "object", "properties": {
        "error": {"type": "string"}}}}, "the schema's error would overwrite"),
])
def test_bad_response_formats_name_the_keyword(tmp_path, tiny_llama, fmt, message):
    write_corpus(tmp_path / "in", n_files=1, rows=15)
    with pytest.raises((JobSpecError, ValueError), match=re.escape(message)):
        make_plan(load_job(_job(tmp_path, tiny_llama, {"kind": "generate",
                                                       "response_format": fmt})))


def test_schema_types_follow_json_schema():
    schema = {"type": "object", "$defs": {"p": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": ["string", "null"]}}, "required": ["x", "y"]}},
        "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/p"}},
                       "ratio": {"type": "number"}, "kind": {"const": 3}},
        "required": ["points"]}
    got = {f.name: f.type for f in fields(schema)}
    assert got["points"] == pa.list_(pa.struct([pa.field("x", pa.int64(), nullable=False),
                                                 pa.field("y", pa.string())]))
    assert got["ratio"] == pa.float64() and got["kind"] == pa.int64()
    assert fields({"type": "string"}, column="answer") == [pa.field("answer", pa.string())]
