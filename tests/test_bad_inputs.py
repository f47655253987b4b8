"""What happens when the input is bad: the matrix docs/bad-input.md lists.

Each case asserts the message a user sees (a validation problem, raised before any model
loads) or the ``error`` value of the row (row-level problems never fail the job). Output
inside the input and corrupt Parquet files are covered in tests/test_job.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import sample_texts, write_job
from transformers import AutoModel, AutoTokenizer

from lepton_batch.engine import Encoder, EngineConfig
from lepton_batch.job.shards import count_duplicate_ids
from lepton_batch.job.spec import JobSpecError, load_job
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job

MAX_LEN = 48
CONTROL_ONLY = "empty text (only whitespace or control characters)"


def _write_job(folder: Path, model_dir: Path | str, input_path: Path | None = None,
               **input_extra) -> Path:
    return write_job(
        folder / "job.yaml",
        name="bad-inputs",
        input={"path": str(input_path or folder / "in"), "rows_per_shard": 20, **input_extra},
        model={"path": str(model_dir), "max_length": MAX_LEN, "dtype": "float32"},
        task={"kind": "embed", "normalize": True},  # a plain HF model is not normalised
        engine={"max_tokens_per_batch": 256, "max_rows_per_batch": 16},
        output={"path": str(folder / "out")},
        cluster={"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    )


def _plan(folder: Path, model_dir: Path | str, overrides=(), **input_extra):
    return make_plan(load_job(_write_job(folder, model_dir, **input_extra), list(overrides)))


def _write_table(folder: Path, name: str = "part.parquet", **columns) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), folder / name)
    return folder / name


def _good_input(folder: Path, n: int = 5) -> None:
    _write_table(folder / "in", id=pa.array(range(n), pa.int64()),
                 text=pa.array(sample_texts(n), pa.string()))


def _read(plan) -> pl.DataFrame:
    return pl.read_parquet(sorted(plan.output_root.glob("run_date=*/*.parquet")))


# --------------------------------------------------------------------------- job file


def test_malformed_yaml(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: t\ninput: {path: data/\n")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_job(job)


def test_yaml_python_tag_is_refused(tmp_path):
    # yaml.safe_load only: a tag that would run code under yaml.load is a parse error.
    job = _write_job(tmp_path, "/models/x")
    job.write_text(job.read_text() + "evil: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_job(job)


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(JobSpecError, match=r"input\.text_colum: unknown key; did you mean "
                       r"'text_column'\?"):
        load_job(_write_job(tmp_path, "/models/x", text_colum="body"))


def test_wrong_type(tmp_path):
    with pytest.raises(JobSpecError, match=r"input\.rows_per_shard: Input should be a valid "
                       r"integer.*\(got 'lots'\)"):
        load_job(_write_job(tmp_path, "/models/x"), ["input.rows_per_shard=lots"])


def test_safety_defaults_are_off(tmp_path):
    job = load_job(_write_job(tmp_path, "/models/x"))
    assert job.model.trust_remote_code is False and job.model.allow_pickle is False


# --------------------------------------------------------------------------- input


def test_missing_input_path(tmp_path, tiny_bert):
    with pytest.raises(JobSpecError, match=r"input\.path: .*nowhere does not exist"):
        _plan(tmp_path, tiny_bert, input_path=tmp_path / "nowhere")


def test_relative_input_path_says_it_resolves_against_the_current_directory(
        tmp_path, tiny_bert, monkeypatch):
    """Issue 28: `input.path: in/ does not exist` left the user guessing the base."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JobSpecError) as exc:
        _plan(tmp_path, tiny_bert, input_path="in/")
    assert (f"input.path: in/ does not exist (a relative path resolves against the current "
            f"directory {tmp_path}: {tmp_path / 'in'}") in str(exc.value)
    (tmp_path / "in").mkdir()
    with pytest.raises(JobSpecError, match="no .* found under in/ .*current directory"):
        _plan(tmp_path, tiny_bert, input_path="in/")


def test_empty_input_directory(tmp_path, tiny_bert):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.csv").write_text("id,text\n1,hi\n")
    with pytest.raises(JobSpecError, match=r"input\.path: no \*\.parquet files found under"):
        _plan(tmp_path, tiny_bert)


def test_missing_text_column(tmp_path, tiny_bert):
    _good_input(tmp_path)
    with pytest.raises(JobSpecError, match=r"input\.text_column: column 'body' not in"):
        _plan(tmp_path, tiny_bert, text_column="body")


def test_missing_id_column(tmp_path, tiny_bert):
    _good_input(tmp_path)
    with pytest.raises(JobSpecError, match=r"input\.id_column: column 'doc_id' not in"):
        _plan(tmp_path, tiny_bert, id_column="doc_id")


def test_text_column_of_int_type(tmp_path, tiny_bert):
    _write_table(tmp_path / "in", id=pa.array([1, 2]), text=pa.array([10, 20], pa.int64()))
    with pytest.raises(JobSpecError, match=r"input\.text_column: 'text' in .* is int64, "
                       r"expected a string \(or binary UTF-8\) column"):
        _plan(tmp_path, tiny_bert)


def _duplicate_input(folder: Path) -> list[int]:
    texts = sample_texts(9)
    a, b = [1, 2, 2, 3], [3, 3, 4, 5, 6]  # 2 twice in one file; 3 three times across two
    _write_table(folder / "in", "a.parquet", id=pa.array(a, pa.int64()), text=texts[:4])
    _write_table(folder / "in", "b.parquet", id=pa.array(b, pa.int64()), text=texts[4:])
    return a + b


def test_duplicate_ids_are_counted_across_files(tmp_path, tiny_bert):
    _duplicate_input(tmp_path)
    assert count_duplicate_ids(_plan(tmp_path, tiny_bert).files, "id") == (2, [2, 3])


def test_duplicate_ids_warned_by_validate(tmp_path, tiny_bert):
    _duplicate_input(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "lepton_batch", "validate", str(_write_job(tmp_path, tiny_bert)),
         "--no-estimate"], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    out = " ".join(res.stdout.split())
    assert ("input.id_column: 2 duplicate id value(s) across the input, e.g. [2, 3]; every "
            "row is still processed and written once") in out
    assert "job is valid" in out


def test_duplicate_ids_every_row_written_once(tmp_path, tiny_bert):
    ids = _duplicate_input(tmp_path)
    plan = _plan(tmp_path, tiny_bert)
    assert run_job(plan).ok
    df = _read(plan)
    assert sorted(df["id"].to_list()) == sorted(ids)
    assert df["error"].null_count() == df.height == len(ids)


# --------------------------------------------------------------------------- rows

ROWS = {  # id -> text; the ids are strings, one of them shaped like a path
    "good": "a plain sentence about files and directories",
    "null": None,
    "empty": "",
    "whitespace": " \t\n  ",
    "control-only": "\x00\x07\n\x1b",
    "control-inside": "tab\tbell\x07 nul\x00 escape\x1b[31m red text",
    "long": "",  # filled with ~1 MB below
    "../../etc/x": "an id that looks like a path",
}


@pytest.fixture(scope="module")
def row_job(tmp_path_factory, tiny_bert):
    """One job over every row-level case; returns (plan, {id: output row}, files before)."""
    base = tmp_path_factory.mktemp("rows")
    rows = dict(ROWS)
    chunk = " ".join(sample_texts(200))
    rows["long"] = (chunk * (1_000_000 // len(chunk) + 1))[:1_000_000]
    _write_table(base / "in", id=pa.array(list(rows), pa.string()),
                 text=pa.array(list(rows.values()), pa.string()))
    plan = _plan(base, tiny_bert)
    root = base.parent  # the session's temp root: a path-like id must not write anywhere here
    before = {p for p in root.rglob("*") if not p.is_relative_to(plan.output_root)}
    result = run_job(plan)
    after = {p for p in root.rglob("*") if not p.is_relative_to(plan.output_root)}
    assert result.ok
    df = _read(plan)
    assert df.height == len(rows)
    return plan, {r["id"]: r for r in df.iter_rows(named=True)}, after - before


def test_row_null(row_job):
    assert row_job[1]["null"]["error"] == "null text"
    assert row_job[1]["null"]["embedding"] is None


def test_row_empty(row_job):
    assert row_job[1]["empty"]["error"] == "empty text"


def test_row_whitespace_only(row_job):
    assert row_job[1]["whitespace"]["error"] == "empty text"


def test_row_control_characters_only(row_job):
    assert row_job[1]["control-only"]["error"] == CONTROL_ONLY
    assert row_job[1]["control-only"]["embedding"] is None


def test_row_control_characters_inside_text_are_processed(row_job):
    row = row_job[1]["control-inside"]
    assert row["error"] is None and row["embedding"] is not None and row["num_tokens"] > 2


def test_row_one_megabyte_is_truncated(row_job):
    row = row_job[1]["long"]
    assert row["error"] is None and row["truncated"] is True and row["num_tokens"] == MAX_LEN
    assert row_job[1]["good"]["truncated"] is False


def test_row_path_like_id_is_copied_never_used_as_a_path(row_job):
    plan, rows, created = row_job
    assert rows["../../etc/x"]["error"] is None
    assert rows["../../etc/x"]["id"] == "../../etc/x"
    assert created == set()  # nothing written outside the output directory
    assert not (plan.output_root / "../../etc/x").exists()
    assert not list(plan.output_root.rglob("x"))


def test_row_invalid_utf8_in_binary_column(tmp_path, tiny_bert):
    _write_table(tmp_path / "in", id=pa.array([1, 2, 3], pa.int64()),
                 text=pa.array([b"caf\xc3\xa9 au lait", b"ok \xff\xfe broken", b"\x00\x07"],
                               pa.binary()))
    plan = _plan(tmp_path, tiny_bert)
    assert run_job(plan).ok
    df = _read(plan).sort("id")
    assert df["error"].to_list() == [None, "invalid UTF-8 at byte 3", CONTROL_ONLY]


# --------------------------------------------------------------------------- model


def _copy_model(src: Path, dst: Path, weights: bool = True, tokenizer: bool = True) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        is_weights = f.suffix == ".safetensors"
        is_tokenizer = f.name.startswith(("tokenizer", "vocab", "special_tokens"))
        if f.name == "config.json" or (weights and is_weights) or (tokenizer and is_tokenizer):
            shutil.copy(f, dst / f.name)
    return dst


def _edit_config(model_dir: Path, **changes) -> None:
    config_file = model_dir / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory, tiny_bert) -> Path:
    """tiny_bert's weights as pytorch_model.bin only (transformers 5 saves safetensors only)."""
    path = _copy_model(tiny_bert, tmp_path_factory.mktemp("pickle") / "model", weights=False)
    torch.save(AutoModel.from_pretrained(tiny_bert).state_dict(), path / "pytorch_model.bin")
    return path


def test_model_directory_missing(tmp_path):
    _good_input(tmp_path)
    with pytest.raises(JobSpecError, match=r"model\.path: .*no-model is not a directory"):
        _plan(tmp_path, tmp_path / "no-model")


def test_model_without_tokenizer(tmp_path, tiny_bert):
    _good_input(tmp_path)
    model = _copy_model(tiny_bert, tmp_path / "model", tokenizer=False)
    with pytest.raises(JobSpecError, match=r"model\.path: .* has no tokenizer files"):
        _plan(tmp_path, model)


def test_model_needing_remote_code(tmp_path, tiny_bert):
    _good_input(tmp_path)
    model = _copy_model(tiny_bert, tmp_path / "model")
    _edit_config(model, model_type="my-bert", architectures=["MyBertModel"],
                 auto_map={"AutoConfig": "configuration_my.MyBertConfig",
                           "AutoModel": "modeling_my.MyBertModel"})
    with pytest.raises(JobSpecError, match=r"model\.trust_remote_code: .* needs custom code "
                       r"\(auto_map in config\.json: AutoConfig -> configuration_my\.MyBertConfig"
                       r".*model_type 'my-bert' is not built in\); set model\.trust_remote_code: "
                       r"true only if you trust that code"):
        _plan(tmp_path, model)
    # Opting in passes validation (the custom code itself is never run here).
    assert _plan(tmp_path, model, ["model.trust_remote_code=true"]).model.model_type == "my-bert"


def test_model_auto_map_over_a_known_type(tmp_path, tiny_bert):
    _good_input(tmp_path)
    model = _copy_model(tiny_bert, tmp_path / "model")
    auto_map = {"AutoModel": "modeling_jina.JinaBertModel"}
    # Built-in architectures: transformers loads its own class, no custom code runs.
    _edit_config(model, auto_map=auto_map, architectures=["BertModel"])
    assert _plan(tmp_path, model).model.model_type == "bert"
    # A custom architecture over model_type bert would load as plain BERT: refused.
    _edit_config(model, architectures=["JinaBertModel"])
    with pytest.raises(JobSpecError, match=r"architectures \['JinaBertModel'\] are not built in"):
        _plan(tmp_path, model)


def test_model_type_unknown_without_auto_map(tmp_path, tiny_bert):
    _good_input(tmp_path)
    model = _copy_model(tiny_bert, tmp_path / "model")
    _edit_config(model, model_type="bert-from-the-future")
    with pytest.raises(JobSpecError, match=r"model_type 'bert-from-the-future' is not one "
                       r"transformers .* knows, and there is no auto_map"):
        _plan(tmp_path, model)


def test_model_types_known_without_importing_transformers():
    """The plan reads transformers' generated model-type table from its file; a type that
    only CONFIG_MAPPING has (registered at run time, or a special case) still counts."""
    from transformers import CONFIG_MAPPING, AutoConfig, BertConfig

    from lepton_batch.job.modeldir import _generated_model_types, _known_model_type

    table = _generated_model_types()
    assert {"bert", "llama", "gpt2", "qwen2"} <= table <= set(CONFIG_MAPPING.keys())
    assert not _known_model_type("bert-from-the-future") and not _known_model_type(None)

    class LateConfig(BertConfig):
        model_type = "lepton-late-bert"

    AutoConfig.register("lepton-late-bert", LateConfig)
    assert "lepton-late-bert" not in table and _known_model_type("lepton-late-bert")


def test_model_with_pickle_only_weights_is_refused(tmp_path, pickle_model):
    _good_input(tmp_path)
    with pytest.raises(JobSpecError, match=r"model\.allow_pickle: .* has only pickled weights "
                       r"\(pytorch_model\.bin\); loading them can run arbitrary code\. Convert "
                       r"to safetensors, or set model\.allow_pickle: true if you trust the file"):
        _plan(tmp_path, pickle_model)


def test_engine_refuses_pickle_without_allow_pickle(pickle_model, tiny_bert):
    # Defence in depth: a plan built elsewhere still cannot make the engine unpickle.
    with pytest.raises(OSError, match="model.safetensors"):
        Encoder(EngineConfig(model_dir=str(pickle_model), head="base"))
    # allow_pickle still prefers safetensors when a model has them.
    assert Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", allow_pickle=True))


def test_model_with_pickle_only_weights_runs_with_allow_pickle(tmp_path, pickle_model,
                                                               tiny_bert):
    _good_input(tmp_path)
    plan = _plan(tmp_path, pickle_model, ["model.allow_pickle=true"])
    assert run_job(plan).ok
    df = _read(plan).sort("id")
    assert df["error"].null_count() == df.height == 5
    # the same weights as tiny_bert's safetensors: the same embedding
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.inference_mode():
        enc = tok(sample_texts(1)[0], truncation=True, max_length=MAX_LEN, return_tensors="pt")
        want = F.normalize(AutoModel.from_pretrained(tiny_bert)(**enc).last_hidden_state[0]
                           .mean(0), dim=-1)
    torch.testing.assert_close(torch.tensor(df["embedding"][0]), want, atol=2e-5, rtol=1e-4)
