"""Out of memory in a batch: split down to one row, keep the size that worked, never lose
the shard. The allocation failure is injected into a real tiny model's ``forward``; every
row that is not refused is computed by the real model and compared with an unconstrained
run."""

from __future__ import annotations

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import sample_texts, write_job
from transformers import AutoModel, AutoTokenizer

from lepton_batch.engine import BatchStats, Encoder, EngineConfig, is_oom
from lepton_batch.job.spec import load_job
from lepton_batch.output.layout import PARTS_GLOB
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job

pytestmark = pytest.mark.timeout(300)

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"


class Injected:
    """Wraps the model's forward: refuses batches of more than ``max_rows`` rows, or any
    batch that holds the ``poison`` row (matched by its exact token ids), with an
    allocation error; records every attempt as (rows, longest row, refused).

    ``target`` is an :class:`Encoder` (its packed forward, or the Hugging Face model's when
    it runs padded) or a Hugging Face model."""

    def __init__(self, target, max_rows: int | None = None, poison: list[int] | None = None,
                 error=torch.OutOfMemoryError) -> None:
        self.max_rows, self.error = max_rows, error
        self.poison = torch.tensor(poison) if poison is not None else None
        self.attempts: list[tuple[int, int, bool]] = []
        if isinstance(target, Encoder) and target.packed is not None:
            self.owner, self.name = target.packed, "hidden"
        else:
            self.owner = target.model if isinstance(target, Encoder) else target
            self.name = "forward"
        self.forward = getattr(self.owner, self.name)
        setattr(self.owner, self.name, self)

    def _has_poison(self, ids: torch.Tensor, mask: torch.Tensor) -> bool:
        m = len(self.poison)
        if ids.shape[1] < m:
            return False
        return bool(((mask.sum(1) == m) & (ids[:, :m] == self.poison).all(1)).any())

    def _check(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        refuse = (self.max_rows is not None and len(ids) > self.max_rows) or (
            self.poison is not None and self._has_poison(ids, mask))
        self.attempts.append((len(ids), int(mask.sum(1).max()), refuse))
        if refuse:
            raise self.error(CPU_OOM if self.error is RuntimeError else "CUDA out of memory")

    def __call__(self, *args, **kwargs):
        if self.name == "hidden":  # packed: rebuild the padded view to check it
            (batch,) = args
            padded = torch.zeros_like(batch.mask)
            padded[batch.row_of, batch.positions] = batch.ids
            self._check(padded, batch.mask)
        else:
            self._check(kwargs["input_ids"], kwargs["attention_mask"])
        return self.forward(*args, **kwargs)


def _after_first_recovery(attempts: list[tuple[int, int, bool]]) -> tuple[int, list]:
    """The size of the first batch that ran after the first refusal, and the attempts
    after that one."""
    first = next(i for i, a in enumerate(attempts) if a[2])
    ok = next(i for i in range(first, len(attempts)) if not attempts[i][2])
    return attempts[ok][0], attempts[ok + 1 :]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sample_texts(200)


@pytest.fixture(params=[True, False], ids=["packed", "padded"])
def engine(tiny_bert, request) -> Encoder:
    return Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=64,
                               dtype="float32", packed=request.param))


def _embed(engine: Encoder, tok, stats=None, max_tokens=1024, max_rows=32):
    return engine.embed(tok, "mean", True, max_tokens=max_tokens, max_rows=max_rows,
                        stats=stats)


def test_is_oom_recognises_cuda_and_cpu_allocators():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError(CPU_OOM))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


def test_oom_splits_and_keeps_the_size_that_worked(engine, texts):
    tok = engine.tokenize(texts)
    want = _embed(engine, tok)
    budget_rows = [min(32, 1024 // int(n)) for n in sorted(tok.lengths, reverse=True)]
    assert max(budget_rows) > 20 > min(budget_rows)  # long rows run, short ones overflow

    inj = Injected(engine, max_rows=20)
    stats = BatchStats()
    got = _embed(engine, tok, stats)

    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert stats.oom_splits > 0 and stats.failed_rows == []
    worked, later = _after_first_recovery(inj.attempts)
    assert stats.max_rows_cap == worked <= 20
    assert later and all(rows <= worked and not refused for rows, _, refused in later)
    assert sum(rows for rows, _, refused in inj.attempts if not refused) == len(texts)
    assert sum(stats.sizes) == len(texts) and stats.tokens == int(tok.lengths.sum())
    longest = [n for _, n, refused in inj.attempts if not refused]
    assert longest == sorted(longest, reverse=True)  # re-planned batches stay longest first


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_a_row_that_cannot_run_alone_is_nan_and_listed(engine, texts, error):
    tok = engine.tokenize(texts)
    want = _embed(engine, tok)
    poison = int(tok.lengths.argsort()[len(texts) // 2])  # a mid-length row, mid-shard
    inj = Injected(engine, poison=tok.row(poison), error=error)
    stats = BatchStats()
    got = _embed(engine, tok, stats)

    assert stats.failed_rows == [poison]
    assert stats.failed_reasons == [
        f"out of memory: a row of {tok.lengths[poison]} tokens could not run even alone; "
        "lower model.max_length or engine.max_tokens_per_batch"]
    assert torch.isnan(got[poison]).all()
    keep = torch.ones(len(texts), dtype=torch.bool)
    keep[poison] = False
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=1e-4)
    assert not torch.isnan(got[keep]).any()
    assert stats.oom_splits > 0 and stats.max_rows_cap is not None
    worked, later = _after_first_recovery(inj.attempts)
    assert all(rows <= worked for rows, _, _ in later)
    # the batches that split down to the refused row lower the cap further, never raise it
    assert stats.max_rows_cap <= worked
    assert sum(stats.sizes) == len(texts) - 1


def test_without_stats_a_lost_row_raises_and_other_errors_pass_through(engine, texts):
    tok = engine.tokenize(texts[:40])
    inj = Injected(engine, poison=tok.row(5))
    with pytest.raises(torch.OutOfMemoryError):
        _embed(engine, tok)  # no stats: nobody could learn the row was lost

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    setattr(inj.owner, inj.name, broken)
    with pytest.raises(RuntimeError, match="mat1"):
        _embed(engine, tok, BatchStats())


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole-shard", "chunks-of-3"])
def test_job_gives_the_refused_row_an_error_and_the_rest_their_embeddings(
        tmp_path, tiny_bert, corpus, monkeypatch, chunk):
    """Also with the shard tokenized and run in chunks: the refused row's position is
    shard-wide, not its chunk's."""
    _, rows = corpus
    ok = [r for r in rows if r["text"] and r["text"].strip()]
    texts = [r["text"] for r in ok]
    victim = next(r for r in ok[20:] if texts.count(r["text"]) == 1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    poison = tokenizer(victim["text"], truncation=True, max_length=48)["input_ids"]

    real_init = Encoder.__init__

    def init_then_inject(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        Injected(self, poison=poison)

    monkeypatch.setattr(Encoder, "__init__", init_then_inject)
    path = write_job(
        tmp_path / "job.yaml", name="oom-job",
        input={"path": str(tmp_path / "in"), "text_column": "text", "id_column": "id",
               "rows_per_shard": 20},
        model={"path": str(tiny_bert), "max_length": 48, "dtype": "float32"},
        task={"kind": "embed", "normalize": True},  # a plain HF model is not normalised
        engine={"max_tokens_per_batch": 256, "max_rows_per_batch": 16,
                "tokenize_chunk_rows": chunk},
        output={"path": str(tmp_path / "out")},
        cluster={"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    )
    plan = make_plan(load_job(path, []))
    result = run_job(plan)
    assert result.ok and len(result.records) == 9
    assert result.error_rows == 9 + 1  # the corpus's 9 bad rows and the refused one
    assert sum(r.oom_splits for r in result.records) > 0

    df = pl.read_parquet(sorted(plan.output_root.glob(PARTS_GLOB))).sort("id")
    assert df.height == len(rows)
    hit = df.filter(pl.col("id") == victim["id"]).row(0, named=True)
    assert hit["embedding"] is None and hit["num_tokens"] == len(poison)
    assert hit["error"] == (f"out of memory: a row of {len(poison)} tokens could not run "
                            "even alone; lower model.max_length or engine.max_tokens_per_batch")

    good = df.filter(pl.col("error").is_null())
    assert good["id"].to_list() == [r["id"] for r in ok if r is not victim]
    model = AutoModel.from_pretrained(tiny_bert).eval()
    with torch.inference_mode():
        want = torch.stack([
            model(**tokenizer(r["text"], truncation=True, max_length=48,
                              return_tensors="pt")).last_hidden_state[0].mean(0)
            for r in ok if r is not victim])
    torch.testing.assert_close(torch.tensor(good["embedding"].to_list()),
                               F.normalize(want, dim=-1), atol=2e-5, rtol=1e-4)
