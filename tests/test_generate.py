"""``generate``: continuous batching against ``model.generate`` on tiny random Llama and
GPT-2 models, stop strings, reproducible sampling, and whole jobs through Dask."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_texts, write_corpus, write_job
from transformers import AutoModelForCausalLM

from lepton_batch.engine import EngineConfig, Tokenized
from lepton_batch.engine.continuous import (
    GenerateStats,
    Sampling,
    generate,
    row_seed,
    shared_prefix,
    uniforms,
)
from lepton_batch.engine.decoder import Decoder
from lepton_batch.engine.graphs import MIN_SPAN, bucket, replay_agrees
from lepton_batch.job.spec import JobSpecError, load_job
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job


def _decoder(model_dir, dtype="float32") -> Decoder:
    return Decoder(EngineConfig(str(model_dir), "causal_lm", dtype=dtype, device="cpu",
                                max_length=256))


def _prompts(dec: Decoder, n: int, prefix: str = "") -> list[list[int]]:
    """Prompts of very different lengths (3 to ~200 tokens) from the sample corpus."""
    texts = [prefix + t for t in sample_texts(n)]
    ids = dec.tokenizer(texts, verbose=False)["input_ids"]
    lengths = [3 + (i * 53) % 200 for i in range(n)]
    return [row[: max(len(dec.tokenizer(prefix)["input_ids"]) + 2, k)]
            for row, k in zip(ids, lengths, strict=True)]


def _reference(model_dir, ids: list[list[int]], max_new: np.ndarray) -> list[list[int]]:
    """``model.generate(do_sample=False)`` one row at a time: no padding to disagree with."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for row, m in zip(ids, max_new, strict=True):
            x = torch.tensor([row])
            g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=int(m), pad_token_id=0)
            out.append(g[0, len(row):].tolist())
    return out


def _strip_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """model.generate pads a row that ended early with pad ids after its EOS."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_greedy_is_token_identical_to_model_generate(arch, graphs, request):
    model_dir = request.getfixturevalue(arch)
    dec = _decoder(model_dir)
    assert dec.stack is not None, dec.forward_reason
    from lepton_batch.kernels.onednn import onednn_ok

    # On CPU the stack runs oneDNN linears (GPT-2's Conv1D included); greedy must not move.
    assert ("oneDNN linears" in dec.forward_reason) == onednn_ok("cpu", dec.dtype)[0]
    ids = _prompts(dec, 24)
    max_new = np.array([1 + (i * 7) % 40 for i in range(len(ids))])
    tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
    stats = GenerateStats()
    # 5 slots for 24 rows and a small prefill budget: slots are refilled many times, and
    # prefills take several rows at once.
    # static: decode-only steps padded to batch and span buckets, as CUDA graphs run them.
    out = generate(dec, tok, max_new, np.zeros(len(ids), dtype=np.int64), Sampling(), [],
                   max_seqs=5, kv_tokens=None, prefill_tokens=400, stats=stats, graphs=graphs)
    ref = _reference(model_dir, ids, max_new)
    eos = dec.eos_ids()
    for i, (ours, theirs) in enumerate(zip(out.tokens, ref, strict=True)):
        assert ours == _strip_eos(theirs, eos), f"row {i} ({len(ids[i])} prompt tokens)"
        want = "eos" if ours and ours[-1] in eos else "length"
        assert out.finish[i] == want
        assert want == "eos" or len(ours) == max_new[i]
    assert stats.slots == 5 and stats.prefills > 5 and max(stats.sizes) > 1
    assert stats.generated_tokens == sum(map(len, out.tokens))
    assert (stats.graph_steps > stats.decode_steps // 2) == graphs


def test_shared_prefix_is_computed_once_and_changes_nothing(tiny_llama):
    dec = _decoder(tiny_llama)
    system = "You are a careful assistant for the Python standard library documentation. "
    ids = _prompts(dec, 10, prefix=system)
    tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
    assert shared_prefix(tok) >= 10
    max_new = np.full(len(ids), 12)
    stats = GenerateStats()
    out = generate(dec, tok, max_new, np.zeros(len(ids), dtype=np.int64), Sampling(), [],
                   4, None, 512, stats)
    assert stats.shared_prefix == shared_prefix(tok)
    eos = dec.eos_ids()
    ref = _reference(tiny_llama, ids, max_new)
    assert out.tokens == [_strip_eos(r, eos) for r in ref]


def test_shared_prefix_leaves_every_row_a_token():
    rows = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 11, 12]]
    tok = Tokenized.from_lists(rows, np.zeros(3, dtype=bool))
    assert shared_prefix(tok) == 4  # row 2 is all prefix: one token is left to it
    short = Tokenized.from_lists([[1, 2, 3], [1, 2, 4]], np.zeros(2, dtype=bool))
    assert shared_prefix(short) == 0  # under MIN_SHARED_PREFIX


def test_stop_string_ends_a_row(tiny_llama):
    dec = _decoder(tiny_llama)
    ids = _prompts(dec, 6)
    tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
    max_new = np.full(len(ids), 30)
    free = generate(dec, tok, max_new, np.zeros(6, dtype=np.int64), Sampling(), [], 4, None,
                    512)
    texts = dec.tokenizer.batch_decode(free.tokens, skip_special_tokens=True)
    row = max(range(6), key=lambda i: len(texts[i]))
    stop = texts[row][len(texts[row]) // 2:][:3]
    assert stop.strip(), texts[row]
    stopped = generate(dec, tok, max_new, np.zeros(6, dtype=np.int64), Sampling(), [stop], 4,
                       None, 512)
    assert stopped.finish[row] == "stop"
    assert len(stopped.tokens[row]) < len(free.tokens[row])
    assert free.tokens[row][: len(stopped.tokens[row])] == stopped.tokens[row]
    from lepton_batch.pipelines.generate import cut_at_stop

    text = dec.tokenizer.decode(stopped.tokens[row], skip_special_tokens=True)
    cut, hit = cut_at_stop(text, [stop])
    assert hit and stop not in cut and texts[row].startswith(cut)


def test_sampling_is_reproducible_whatever_the_batch(tiny_llama):
    dec = _decoder(tiny_llama)
    ids = _prompts(dec, 12)
    seeds = np.array([row_seed(7, i) for i in range(12)], dtype=np.int64)
    sampling = Sampling(do_sample=True, temperature=0.9, top_k=40, top_p=0.95,
                        repetition_penalty=1.2)
    max_new = np.array([5 + i for i in range(12)])
    tok = Tokenized.from_lists(ids, np.zeros(12, dtype=bool))
    full = generate(dec, tok, max_new, seeds, sampling, [], 8, None, 2048)
    # Another batch composition: every other row, reversed, 3 slots.
    pick = list(range(11, -1, -2))
    sub = Tokenized.from_lists([ids[i] for i in pick], np.zeros(len(pick), dtype=bool))
    part = generate(dec, sub, max_new[pick], seeds[pick], sampling, [], 3, None, 100)
    for j, i in enumerate(pick):
        assert part.tokens[j] == full.tokens[i]
    # Decode steps with static shapes (as CUDA graphs run them) draw the same tokens.
    static = generate(dec, tok, max_new, seeds, sampling, [], 5, None, 300, graphs=True)
    assert static.tokens == full.tokens
    other = generate(dec, tok, max_new, seeds + 1, sampling, [], 8, None, 2048)
    assert other.tokens != full.tokens  # the seed matters
    greedy = generate(dec, tok, max_new, seeds, Sampling(), [], 8, None, 2048)
    assert greedy.tokens != full.tokens


def test_static_decode_buckets():
    assert [bucket(n, 48) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    assert [bucket(n, 300, MIN_SPAN) for n in (1, 64, 65, 200, 257)] == [64, 64, 128, 256, 300]


def test_replay_check_allows_rounding_and_catches_a_broken_capture():
    """A CUDA graph's replay is checked against the eager step: bf16 rounding compounded
    over the layers passes (an H200 replay of a 24-layer bf16 Llama differed by 0.047, and
    the old fixed 1e-2 tolerance turned the graphs off); a stale or mis-addressed buffer,
    off by the logits' own scale, does not; fp32 is held far tighter."""
    torch.manual_seed(0)
    eager = torch.randn(8, 800) * 3  # largest |logit| ~ 12
    rounding = eager + torch.randn_like(eager).clamp(-3, 3) * 0.005
    rounding[0, 0] = eager[0, 0] + 0.0469
    assert replay_agrees(rounding, eager, torch.bfloat16) == (True, pytest.approx(0.0469,
                                                                                  abs=1e-5))
    stale = eager[torch.randperm(8)]
    assert not replay_agrees(stale, eager, torch.bfloat16)[0]
    assert not replay_agrees(torch.zeros_like(eager), eager, torch.float16)[0]
    assert not replay_agrees(rounding, eager, torch.float32)[0]
    assert replay_agrees(eager + 1e-5, eager, torch.float32)[0]


def test_uniforms_are_per_row_and_step():
    a = uniforms(np.array([1, 2, 3]), np.array([0, 0, 0]))
    b = uniforms(np.array([3, 2, 1]), np.array([0, 0, 0]))
    assert np.array_equal(a, b[::-1]) and len(set(a)) == 3
    assert ((a > 0) & (a < 1)).all()
    assert uniforms(np.array([1]), np.array([1]))[0] != a[0]
    many = uniforms(np.arange(20000), np.zeros(20000, dtype=np.int64))
    assert abs(many.mean() - 0.5) < 0.01


def test_logits_processors_match_transformers():
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    history = torch.randint(0, 50, (4, 9))
    ours = Sampling(do_sample=True, temperature=0.7, top_k=10, top_p=0.8,
                    repetition_penalty=1.3).process(logits.clone(), history)
    theirs = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                 TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        theirs = proc(history, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    assert torch.allclose(ours[finite], theirs[finite])


def _causal_job(tmp_path, model_dir, task, overrides=(), rows_per_shard=20, out="out"):
    path = write_job(
        tmp_path / "job.yaml",
        name="gen-job",
        input={"path": str(tmp_path / "in"), "text_column": "text", "id_column": "id",
               "passthrough_columns": ["lang"], "rows_per_shard": rows_per_shard},
        model={"path": str(model_dir), "dtype": "float32"},
        task=task,
        engine={"max_num_seqs": 6, "max_tokens_per_batch": 512},
        output={"path": str(tmp_path / out)},
        cluster={"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    )
    return make_plan(load_job(path, list(overrides)))


def _read(plan) -> pl.DataFrame:
    return pl.read_parquet(sorted(plan.output_root.glob("run_date=*/*.parquet"))).sort("id")


def test_generate_job_writes_generations_and_records_bad_rows(tmp_path, tiny_llama):
    rows = write_corpus(tmp_path / "in", n_files=2, rows=25)  # null, empty, blank rows
    long_text = " ".join(sample_texts(60))  # far over the 256-token context
    table = pq.read_table(tmp_path / "in" / "corpus-0.parquet")
    texts = table["text"].to_pylist()
    texts[5] = long_text
    limits = [None if i % 3 else 4 + i for i in range(table.num_rows)]
    limits[8] = -1
    table = table.set_column(1, "text", pa.array(texts)).append_column(
        "budget", pa.array(limits, pa.int64()))
    pq.write_table(table, tmp_path / "in" / "corpus-0.parquet", row_group_size=10)
    other = pq.read_table(tmp_path / "in" / "corpus-1.parquet")
    pq.write_table(other.append_column("budget", pa.nulls(other.num_rows, pa.int64())),
                   tmp_path / "in" / "corpus-1.parquet", row_group_size=10)
    plan = _causal_job(tmp_path, tiny_llama, {
        "kind": "generate", "prompt": "Question about {lang} docs: {text}\nAnswer:",
        "max_new_tokens": 16, "max_new_tokens_column": "budget"})
    result = run_job(plan)
    assert result.ok, result
    df = _read(plan)
    assert df.height == len(rows) and df["id"].n_unique() == df.height
    assert df.columns[:2] == ["id", "lang"]
    assert {"generation", "finish_reason", "prompt_tokens", "generated_tokens",
            "truncated", "error"} <= set(df.columns)
    by_id = {r["id"]: r for r in df.iter_rows(named=True)}
    assert by_id[3]["error"] == "text: null text" and by_id[3]["generation"] is None
    assert by_id[7]["error"].startswith("text: empty text")
    assert by_id[8]["error"] == "budget: -1 is not a positive integer"
    assert by_id[5]["truncated"] and by_id[5]["error"] is None
    assert by_id[5]["prompt_tokens"] + by_id[5]["generated_tokens"] <= 256
    good = df.filter(pl.col("error").is_null())
    assert set(good["finish_reason"]) <= {"eos", "length", "stop"}
    assert (good["generated_tokens"] >= 1).all()
    assert by_id[0]["generated_tokens"] <= 4  # budget column: 4 + 0
    assert by_id[1]["generated_tokens"] <= 16  # null budget: task.max_new_tokens
    assert (good["prompt_tokens"] == good["num_tokens"]).all()
    meta = json.loads(pq.read_schema(next(plan.output_root.glob("run_date=*/*.parquet")))
                      .metadata[b"lepton_batch"])
    assert meta["task"] == "generate"

    # The generation is what the engine makes of the rendered prompt.
    dec = _decoder(tiny_llama)
    prompt = f"Question about en docs: {rows[1]['text']}\nAnswer:"
    ids = dec.tokenizer(prompt)["input_ids"]
    ref = _reference(tiny_llama, [ids], np.array([16]))[0]
    ref = _strip_eos(ref, dec.eos_ids())
    assert by_id[1]["generation"] == dec.tokenizer.decode(ref, skip_special_tokens=True)


def test_sampled_job_is_identical_after_resume_and_reshard(tmp_path, tiny_llama):
    write_corpus(tmp_path / "in", n_files=1, rows=30)
    task = {"kind": "generate", "do_sample": True, "temperature": 0.8, "seed": 11,
            "max_new_tokens": 10, "chat": True, "system": "Be brief."}
    plan = _causal_job(tmp_path, tiny_llama, task)
    assert run_job(plan).ok
    first = _read(plan)
    victim = plan.shards[1]
    next(plan.output_root.glob(f"run_date=*/{victim.part_name}")).unlink()
    (plan.output_root / "_manifest" / f"{victim.fingerprint}.json").unlink()
    again = run_job(plan)
    assert [r.shard_fingerprint for r in again.records] == [victim.fingerprint]
    assert _read(plan).drop("run_id").equals(first.drop("run_id"))
    # Other shards, so other batch compositions: the same text for every row.
    other = _causal_job(tmp_path, tiny_llama, task, rows_per_shard=7, out="out2")
    assert run_job(other).ok
    assert _read(other).select("id", "generation").equals(first.select("id", "generation"))
    reseeded = _causal_job(tmp_path, tiny_llama, {**task, "seed": 12}, out="out3")
    assert run_job(reseeded).ok
    assert not _read(reseeded)["generation"].equals(first["generation"])


@pytest.mark.parametrize(("task", "message"), [
    ({"kind": "generate", "prompt": "Summarize {body}"}, "column 'body'"),
    ({"kind": "generate", "prompt": "Summarize {text!r}"}, "format spec or conversion"),
    ({"kind": "generate", "pooling": "mean"}, "pooling does not apply"),
    ({"kind": "embed", "max_new_tokens": 5}, "max_new_tokens only apply to kind: generate"),
    ({"kind": "score", "temperature": 0.5}, "temperature only apply to kind: generate"),
    ({"kind": "generate", "system": "hi"}, "set task.chat: true"),
    ({"kind": "generate", "stop": [""]}, "empty string"),
    ({"kind": "generate", "max_new_tokens": 256}, "leaves no room for a prompt"),
])
def test_bad_generate_jobs_name_the_field(tmp_path, tiny_llama, task, message):
    write_corpus(tmp_path / "in", n_files=1, rows=15)
    with pytest.raises(JobSpecError, match=message):
        _causal_job(tmp_path, tiny_llama, task)


def test_model_mismatches_are_validation_errors(tmp_path, tiny_llama, tiny_bert):
    import shutil

    write_corpus(tmp_path / "in", n_files=1, rows=15)
    with pytest.raises(JobSpecError, match="needs a causal language model"):
        _causal_job(tmp_path, tiny_bert, {"kind": "generate"})
    with pytest.raises(JobSpecError, match="int8 is for embed and classify"):
        _causal_job(tmp_path, tiny_llama, {"kind": "generate"}, ["model.quantization=int8"])
    plain = tmp_path / "no-chat"
    shutil.copytree(tiny_llama, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for f in plain.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(JobSpecError, match="has no chat template"):
        _causal_job(tmp_path, plain, {"kind": "generate", "chat": True})


def test_sliding_window_longer_than_the_context_is_fine():
    from transformers import MistralConfig

    from lepton_batch.engine.decoder import stack_support

    config = MistralConfig(sliding_window=4096, max_position_embeddings=32768)
    ok, why = stack_support(config, 32768)
    assert not ok and "set model.max_length to at most 4096" in why
    assert stack_support(config, 4096)[0]
    assert not stack_support(type("C", (), {"model_type": "gemma"})(), 512)[0]


def test_model_generation_config_sets_the_sampling_defaults(tmp_path):
    from lepton_batch.job.generation import resolve_generation
    from lepton_batch.job.spec import TaskSpec

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    s = resolve_generation(tmp_path, TaskSpec(kind="generate"), "text")
    assert (s.do_sample, s.temperature, s.top_p, s.top_k) == (True, 0.6, 0.9, 50)
    assert s.sources["temperature"] == "model (generation_config.json)"
    s = resolve_generation(tmp_path, TaskSpec(kind="generate", temperature=0), "text")
    assert not s.do_sample and "temperature" not in s.values()
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    s = resolve_generation(tmp_path, TaskSpec(kind="generate", top_k=5), "body")
    assert (s.do_sample, s.top_k, s.temperature, s.prompt) == (True, 5, 1.0, "{body}")
    assert s.sources["do_sample"] == "job (a sampling field is set)"
    assert resolve_generation(tmp_path, TaskSpec(kind="generate"), "text").do_sample is False


@pytest.mark.slow
def test_example_jobs_run_on_a_local_model(tmp_path, tiny_llama, monkeypatch):
    """jobs/summarize.yaml, extract.yaml and perplexity.yaml, as written, with model.path
    set (extract's answers cut at 6 tokens: each row an error row that keeps its text)."""
    from conftest import REPO

    monkeypatch.chdir(REPO)
    for name, column in (("summarize", "generation"), ("extract", "generation"),
                         ("perplexity", "perplexity")):
        job = load_job(REPO / "jobs" / f"{name}.yaml", [
            f"model.path={tiny_llama}", f"output.path={tmp_path / name}",
            {"summarize": "task.max_new_tokens=4", "extract": "task.max_new_tokens=6"}.get(
                name, "model.dtype=auto"), "cluster.processes=false"])
        result = run_job(make_plan(job))
        assert result.ok
        df = pl.read_parquet(sorted((tmp_path / name).glob("run_date=*/*.parquet")))
        assert df.height == sum(pq.read_metadata(f).num_rows
                                for f in (REPO / "data" / "samples").glob("*.parquet"))
        if name == "extract":
            assert df.schema["mentions"] == pl.List(pl.String), df.schema
            ran = df.filter(pl.col("generation").is_not_null())
            assert ran["generation"].str.starts_with("{").all()
            assert ran["error"].str.contains("not valid JSON").all()
            continue
        assert df.filter(pl.col("error").is_null())[column].null_count() == 0


def _family(tmp_path, tiny_llama, model_type: str):
    """A tiny random model of another family of the decoder stack, saved beside a copy of
    the tiny Llama's tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path / model_type
    shutil.copytree(tiny_llama, path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / "config.json").unlink()
    extra = {"sliding_window": None} if model_type in ("mistral", "qwen2", "qwen3") else {}
    config = AutoConfig.for_model(
        model_type, vocab_size=800, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2, tie_word_embeddings=False, **extra)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_families_match_model_generate(tmp_path, tiny_llama, model_type):
    """Qwen2 has q/k/v biases, Qwen3 per-head q/k norms, Mistral is Llama-shaped."""
    model_dir = _family(tmp_path, tiny_llama, model_type)
    dec = _decoder(model_dir)
    assert dec.stack is not None, dec.forward_reason
    ids = _prompts(dec, 8)
    max_new = np.array([4 + 3 * i for i in range(8)])
    tok = Tokenized.from_lists(ids, np.zeros(8, dtype=bool))
    out = generate(dec, tok, max_new, np.zeros(8, dtype=np.int64), Sampling(), [], 3, None,
                   300)
    ref = _reference(model_dir, ids, max_new)
    assert out.tokens == [_strip_eos(r, dec.eos_ids()) for r in ref]


def test_auto_dtype_is_what_from_pretrained_loads():
    import torch as t

    from lepton_batch.engine.decoder import resolve_causal_dtype

    assert resolve_causal_dtype("auto", "cpu", "bfloat16") == t.bfloat16
    assert resolve_causal_dtype("auto", "cpu", t.float32) == t.float32
    assert resolve_causal_dtype("auto", "cpu", None) == t.float32
    assert resolve_causal_dtype("auto", "cpu", "float16") == t.float32  # emulated on CPU
    assert resolve_causal_dtype("float16", "cpu", "bfloat16") == t.float16  # the job's word


def test_a_sampling_field_means_sampling_as_in_openai_and_vllm(tmp_path, tiny_llama):
    """Issue 28, bug 4: temperature 0.7 with do_sample unset sampled nothing (every row
    equal to greedy); temperature 0 is greedy."""
    write_corpus(tmp_path / "in", n_files=1, rows=50)
    greedy = _causal_job(tmp_path, tiny_llama, {"kind": "generate", "max_new_tokens": 8},
                         out="greedy")
    assert run_job(greedy).ok
    sampled = _causal_job(tmp_path, tiny_llama, {"kind": "generate", "max_new_tokens": 8,
                                                 "temperature": 0.7}, out="sampled")
    assert run_job(sampled).ok
    a, b = _read(greedy), _read(sampled)
    good = a["error"].is_null()
    same = int((a.filter(good)["generation"] == b.filter(good)["generation"]).sum())
    print(f"rows equal to greedy with temperature 0.7: {same} / {int(good.sum())}")
    assert same < good.sum() // 2
    # The file metadata carries the generation settings, as it carries an embed's pooling.
    meta = json.loads(pq.read_schema(next(sampled.output_root.glob("run_date=*/*.parquet")))
                      .metadata[b"lepton_batch"])
    generation = json.loads(meta["settings"])["generation"]
    assert generation == {"prompt": "{text}", "chat": False, "do_sample": True,
                          "temperature": 0.7, "top_k": 50, "top_p": 1.0, "seed": 0,
                          "repetition_penalty": 1.0, "max_new_tokens": 8, "stop": []}
    assert sampled.job_fingerprint != greedy.job_fingerprint
    zero = _causal_job(tmp_path, tiny_llama, {"kind": "generate", "max_new_tokens": 8,
                                              "temperature": 0}, out="zero")
    assert run_job(zero).ok
    assert _read(zero)["generation"].equals(a["generation"])


def test_validate_shows_the_generation_settings(tmp_path, tiny_llama):
    import io

    from rich.console import Console

    from lepton_batch.cli.validate import settings_table as _settings_table

    write_corpus(tmp_path / "in", n_files=1, rows=15)
    plan = _causal_job(tmp_path, tiny_llama, {
        "kind": "generate", "prompt": "Q: {text}\nA:", "top_p": 0.9, "stop": ["\n\n"],
        "max_new_tokens": 12})
    out = io.StringIO()
    Console(file=out, width=200).print(_settings_table(plan.settings, True))
    lines = [" ".join(line.replace("│", " ").split()) for line in out.getvalue().splitlines()]
    for want in ("prompt 'Q: {text}\\nA:' job", "do_sample true job (a sampling field is set)",
                 "top_p 0.9 job", "temperature 1.0 lepton-batch default (as model.generate)",
                 'stop ["\\n\\n"] job', "max_new_tokens 12 job", "max_length 256"):
        assert any(line.startswith(want) for line in lines), (want, lines)
