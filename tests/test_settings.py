"""Settings resolution: the model directory's sentence-transformers files are the defaults,
job values win (with a warning when they contradict the model), and the result embeds
exactly as ``SentenceTransformer(dir).encode`` does."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import sample_texts, write_corpus, write_job

from lepton_batch.engine import BatchStats, Encoder, EngineConfig
from lepton_batch.job.modeldir import inspect_model_dir
from lepton_batch.job.settings import DEFAULT, Settings, SettingsError, resolve_settings
from lepton_batch.job.spec import EngineSpec, InputSpec, JobSpecError, ModelSpec, TaskSpec, load_job
from lepton_batch.pipelines import make_pipeline
from lepton_batch.plan.build import make_plan

ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize",
     "type": "sentence_transformers.models.Normalize"},
]
PROMPTS = {"query": "query: ", "document": ""}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def st_dir(tmp_path: Path, tiny_bert: Path, *, modules=ST_MODULES, max_seq_length=64,
           pooling: dict | None = None, prompts=PROMPTS, default_prompt="query",
           lower=False) -> Path:
    """tiny_bert copied, plus the files sentence-transformers saves beside a model."""
    d = tmp_path / "st-model"
    shutil.copytree(tiny_bert, d)
    _write(d / "modules.json", modules)
    _write(d / "sentence_bert_config.json",
           {"max_seq_length": max_seq_length, "do_lower_case": lower})
    _write(d / "1_Pooling" / "config.json",
           {"word_embedding_dimension": 32, **(pooling or {"pooling_mode_cls_token": True})})
    _write(d / "config_sentence_transformers.json",
           {"prompts": prompts, "default_prompt_name": default_prompt})
    return d


def _resolve(model_dir: Path, model: dict | None = None, **task) -> Settings:
    return resolve_settings(inspect_model_dir(model_dir),
                            ModelSpec(path=str(model_dir), **(model or {})),
                            TaskSpec(**{"kind": "embed", **task}))


def test_model_settings_are_the_defaults(tmp_path, tiny_bert):
    s = _resolve(st_dir(tmp_path, tiny_bert))
    assert (s.max_length, s.pooling, s.normalize, s.prompt, s.lowercase, s.include_prompt) == \
        (64, "cls", True, "query: ", False, True)
    assert s.sources == {
        "max_length": "model (sentence_bert_config.json)",
        "lowercase": "model (sentence_bert_config.json)",
        "pooling": "model (1_Pooling/config.json)",
        "include_prompt": "model (1_Pooling/config.json)",
        "normalize": "model (modules.json)",
        "prompt": "model (config_sentence_transformers.json)",
    }
    assert s.warnings == ()


def test_job_values_win_with_a_warning(tmp_path, tiny_bert, caplog):
    d = st_dir(tmp_path, tiny_bert)
    with caplog.at_level(logging.WARNING, logger="lepton_batch.job.settings"):
        s = _resolve(d, {"max_length": 32}, pooling="max", normalize=False, prompt="")
    assert (s.max_length, s.pooling, s.normalize, s.prompt) == (32, "max", False, "")
    assert {s.sources[k] for k in ("max_length", "pooling", "normalize", "prompt")} == {"job"}
    assert [w.split(":")[0] for w in s.warnings] == [
        "model.max_length", "task.pooling", "task.normalize", "task.prompt"]
    assert "sentence_bert_config.json says 64" in s.warnings[0]
    assert [r.getMessage() for r in caplog.records] == list(s.warnings)
    # a job value equal to the model's is no contradiction
    assert _resolve(d, {"max_length": 64}, pooling="cls", normalize=True).warnings == ()


def test_plain_model_falls_back_like_sentence_transformers(tmp_path, tiny_bert):
    s = _resolve(tiny_bert, {"max_length": 48})  # below the model's limit: no warning
    assert (s.max_length, s.warnings) == (48, ())
    s = _resolve(tiny_bert)
    assert (s.max_length, s.pooling, s.normalize, s.prompt, s.lowercase) == \
        (128, "mean", False, "", False)
    assert s.sources["max_length"] == "model (tokenizer_config.json model_max_length)"
    assert all(s.sources[k] == DEFAULT for k in ("pooling", "normalize", "prompt", "lowercase"))
    # no usable model_max_length (transformers writes 1e30 for "none"): max_position_embeddings
    d = tmp_path / "no-limit"
    shutil.copytree(tiny_bert, d)
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**tok_config,
                                                         "model_max_length": 1e30}))
    s = _resolve(d)
    assert (s.max_length, s.sources["max_length"]) == \
        (128, "model (config.json max_position_embeddings)")


def test_prompt_name_picks_one_of_the_models_prompts(tmp_path, tiny_bert):
    d = st_dir(tmp_path, tiny_bert)
    s = _resolve(d, prompt_name="document")
    assert (s.prompt, s.sources["prompt"], s.warnings) == ("", "job", ())
    assert _resolve(d, prompt_name="query").prompt == "query: "
    assert _resolve(d, prompt="passage: ").apply(["a"]) == ["passage: a"]
    with pytest.raises(SettingsError, match=r"task.prompt_name: 'nope' is not one of the "
                       r"model's prompts .*\('query', 'document'\)"):
        _resolve(d, prompt_name="nope")
    with pytest.raises(SettingsError, match=r"task.prompt_name: 'query' .*\(none\)"):
        _resolve(tiny_bert, prompt_name="query")


def test_prompt_and_prompt_name_together_is_an_error(tmp_path):
    job = write_job(tmp_path / "job.yaml", name="j", input={"path": "x"}, model={"path": "m"},
                    task={"kind": "embed", "prompt": "q: ", "prompt_name": "query"},
                    output={"path": "out"})
    with pytest.raises(JobSpecError, match="task.prompt .* or task.prompt_name"):
        load_job(job)


def _plan(tmp_path, model_dir, task=None, model=None):
    write_corpus(tmp_path / "in", n_files=1, rows=20, bad=False)
    job = write_job(tmp_path / "job.yaml", name="j", input={"path": str(tmp_path / "in")},
                    model={"path": str(model_dir), **(model or {})},
                    task={"kind": "embed", **(task or {})}, output={"path": str(tmp_path / "o")})
    return make_plan(load_job(job))


@pytest.mark.parametrize(("extra", "what"), [
    ({"modules": [*ST_MODULES[:2], {"idx": 2, "name": "2", "path": "2_Dense",
                                    "type": "sentence_transformers.models.Dense"}]},
     "Dense (2_Dense)"),
    ({"pooling": {"pooling_mode": "weightedmean"}},
     "pooling mode weightedmean in 1_Pooling/config.json"),
    ({"pooling": {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}},
     "pooling mode max+mean"),
])
def test_unsupported_module_is_a_problem_unless_pooling_is_set(tmp_path, tiny_bert, extra,
                                                                what):
    d = st_dir(tmp_path, tiny_bert, **extra)
    with pytest.raises(JobSpecError, match=f"task.pooling: lepton-batch cannot apply the "
                       f"model's {re.escape(what)} .*Set task.pooling"):
        _plan(tmp_path, d)
    plan = _plan(tmp_path, d, {"pooling": "mean"})
    assert plan.settings.pooling == "mean"
    assert any(w.startswith("task.pooling") and "not applied" in w
               for w in plan.settings.warnings)
    # a classifier head never pools: nothing to refuse or warn about
    assert _resolve(d, kind="classify").warnings == ()


def test_fingerprint_hashes_resolved_settings(tmp_path, tiny_bert):
    d = st_dir(tmp_path, tiny_bert)
    implicit = _plan(tmp_path, d)
    explicit = _plan(tmp_path, d, {"pooling": "cls", "normalize": True, "prompt": "query: "},
                     {"max_length": 64})
    assert implicit.job_fingerprint == explicit.job_fingerprint
    _write(d / "sentence_bert_config.json", {"max_seq_length": 32})
    changed = _plan(tmp_path, d)
    assert changed.settings.max_length == 32
    assert changed.job_fingerprint != implicit.job_fingerprint


def test_model_max_length_over_positions_names_its_source(tmp_path, tiny_bert):
    d = st_dir(tmp_path, tiny_bert, max_seq_length=4096)
    with pytest.raises(JobSpecError, match=r"model.max_length: 4096 from the model "
                       r"\(sentence_bert_config.json\) exceeds the model's "
                       r"max_position_embeddings \(128\); set model.max_length"):
        _plan(tmp_path, d)
    assert _plan(tmp_path, d, model={"max_length": 100}).settings.max_length == 100


def _ours(model_dir: Path, texts: list[str], **task) -> np.ndarray:
    """Embeddings through the real engine and pipeline (no Dask), as a shard would get them."""
    info = inspect_model_dir(model_dir)
    spec = TaskSpec(**{"kind": "embed", **task})
    settings = resolve_settings(info, ModelSpec(path=str(model_dir)), spec)
    pipeline = make_pipeline(spec, info, settings, InputSpec(path="unused"))
    engine = Encoder(EngineConfig(model_dir=str(model_dir), head="base",
                                 max_length=settings.max_length, dtype="float32"))
    texts, _ = pipeline.prepare(pa.table({"text": texts}))
    tok = pipeline.tokenize(engine, texts)
    emb = pipeline.run(engine, tok, EngineSpec(max_tokens_per_batch=512), BatchStats())
    return np.asarray(emb["embedding"].to_pylist(), dtype=np.float32)


def _long_texts(n: int) -> list[str]:
    texts = sorted(sample_texts(400), key=len, reverse=True)
    return texts[:n] + ["Short ROW, Mixed Case."]


@pytest.mark.parametrize(("pooling", "include_prompt", "lower"), [
    ({"pooling_mode_mean_tokens": True}, True, False),
    ({"pooling_mode_cls_token": True}, False, True),
    ({"pooling_mode": "max"}, True, False),
    ({"pooling_mode": "max", "include_prompt": False}, False, False),
    ({"pooling_mode": "lasttoken"}, True, True),
    ({"pooling_mode_mean_tokens": True, "include_prompt": False}, False, False),
])
def test_matches_sentence_transformers_on_a_model_with_settings(tmp_path, tiny_bert, pooling,
                                                                include_prompt, lower):
    st = pytest.importorskip("sentence_transformers")
    d = st_dir(tmp_path, tiny_bert, pooling=pooling, lower=lower)
    texts = _long_texts(6)
    ours = _ours(d, texts)
    ref = st.SentenceTransformer(str(d), device="cpu").encode(texts, batch_size=4)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_plain_model_matches_sentence_transformers(tiny_bert):
    st = pytest.importorskip("sentence_transformers")
    texts = _long_texts(5)
    model = st.SentenceTransformer(str(tiny_bert), device="cpu")
    assert model.max_seq_length == 128
    assert len(model.tokenize(texts[:1])["input_ids"][0]) == 128  # the rows are truncated
    ref = model.encode(texts, batch_size=4)
    ours = _ours(tiny_bert, texts)
    assert abs(np.linalg.norm(ours[0]) - 1) > 1e-3  # a plain model is not normalised
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_validate_shows_each_setting_and_its_source(tmp_path, tiny_bert):
    from typer.testing import CliRunner

    from lepton_batch.cli.app import app

    d = st_dir(tmp_path, tiny_bert)
    write_corpus(tmp_path / "in", n_files=1, rows=20, bad=False)
    job = write_job(tmp_path / "job.yaml", name="j", input={"path": str(tmp_path / "in")},
                    model={"path": str(d)}, task={"kind": "embed", "normalize": False},
                    output={"path": str(tmp_path / "o")})
    res = CliRunner().invoke(app, ["validate", str(job), "--no-estimate"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in res.output.splitlines() if line.count("│") == 4}
    assert rows["max_length"] == ["64", "model (sentence_bert_config.json)"]
    assert rows["pooling"] == ["cls", "model (1_Pooling/config.json)"]
    assert rows["normalize"] == ["false", "job"]
    assert rows["prompt"] == ["'query: '", "model (config_sentence_transformers.json)"]
    assert rows["lowercase"] == ["false", "model (sentence_bert_config.json)"]
    out = " ".join(res.output.split())
    assert ("warning: task.normalize: the job sets False but the model's modules.json says "
            "True") in out
    assert "64 tokens, from the model (sentence_bert_config.json)" in out
