"""The three parts of ``generate``, each alone: the scheduler with a step function that
returns fixed token ids (no model), the sampler on given logits, and the step runner on a
tiny random Llama against a plain Hugging Face forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lepton_batch.engine import EngineConfig, Tokenized
from lepton_batch.engine.decoder import Decoder
from lepton_batch.engine.kvcache import KVCache
from lepton_batch.engine.sampler import Sampler, Sampling, row_seed
from lepton_batch.engine.scheduler import GenerateStats, Scheduler, StepPlan, slot_count
from lepton_batch.engine.steps import StepRunner, shared_prefix

EOS = 2


def _tok(rows: list[list[int]]) -> Tokenized:
    return Tokenized.from_lists(rows, np.zeros(len(rows), dtype=bool))


def _plan(last=(), pos=(), admitted=(), rows=None, generated=None, next_pos=None) -> StepPlan:
    """A step plan as the scheduler makes one; rows/generated/next_pos default to the
    decoded slots' rows 0.. followed by the admitted rows, at their first token."""
    def arr(x) -> np.ndarray:
        return np.asarray(x, dtype=np.int64)

    last, pos, admitted = arr(last), arr(pos), arr(admitted)
    if rows is None:
        rows = np.concatenate([np.arange(len(last)), admitted])
    if generated is None:
        generated = np.zeros(len(rows))
    if next_pos is None:
        next_pos = pos + 1
    return StepPlan(last, pos, admitted, arr(rows), arr(generated), arr(next_pos))


# -- scheduler -----------------------------------------------------------------------------

def test_scheduler_admits_within_the_kv_budget_and_frees_a_slot_on_eos():
    lengths = np.array([5, 3, 8, 4, 6], dtype=np.int64)
    max_new = np.array([3, 3, 3, 3, 3], dtype=np.int64)
    max_len = int((lengths + max_new).max())  # 11
    # A cache of 30 tokens holds two sequences of up to 11 tokens, though 4 were asked for.
    slots = slot_count(4, len(lengths), 30, max_len)
    assert slots == 2
    assert slot_count(4, 3, 10_000, max_len) == 3  # never more slots than rows
    assert slot_count(4, 5, 5, max_len) == 1  # at least one
    ends_on_eos = {2: 1}  # row 2 (the longest prompt) says EOS as its first token
    stats = GenerateStats()
    sched = Scheduler(lengths, max_new, [EOS], slots, prefill_tokens=100, stats=stats)
    steps: list[StepPlan] = []
    moves: list[tuple[int, int, int]] = []

    def step(plan: StepPlan) -> np.ndarray:
        """Fixed ids: row r says 10 + r, or EOS at its ``ends_on_eos[r]``-th token."""
        steps.append(plan)
        assert len(plan.rows) <= slots
        return np.array([EOS if ends_on_eos.get(int(r)) == g + 1 else 10 + r
                         for r, g in zip(plan.rows, plan.generated, strict=True)])

    out = sched.run(step, lambda src, dst, length: moves.append((src, dst, length)))
    # Longest prompts first: rows 2 (8 tokens) and 4 (6) fill both slots in one prefill.
    assert steps[0].admitted.tolist() == [2, 4] and len(steps[0].last) == 0
    assert steps[0].next_pos.tolist() == [8, 6]
    # Row 2 ended on EOS in slot 0; row 4 moved from slot 1 into it (its 6 prompt tokens in
    # the cache, its first new token not yet), and the next step admits row 0 into slot 1.
    assert out.tokens[2] == [EOS] and out.finish[2] == "eos"
    assert moves[0] == (1, 0, 6)
    assert steps[1].admitted.tolist() == [0] and steps[1].rows.tolist() == [4, 0]
    assert steps[1].last.tolist() == [14] and steps[1].pos.tolist() == [6]
    for r in (0, 1, 3, 4):
        assert out.tokens[r] == [10 + r] * 3 and out.finish[r] == "length"
    assert [int(r) for p in steps for r in p.admitted] == [2, 4, 0, 3, 1]
    assert stats.generated_tokens == sum(map(len, out.tokens)) == 13
    assert stats.decode_steps == sum(1 for p in steps if len(p.last))


def test_scheduler_keeps_to_the_prefill_budget_and_stops_on_a_stop_string():
    lengths = np.array([4, 4, 4, 4], dtype=np.int64)
    max_new = np.array([5, 5, 5, 5], dtype=np.int64)
    # 8 padded prompt tokens per prefill: two 4-token prompts at a time, into 4 slots.
    sched = Scheduler(lengths, max_new, [], 4, prefill_tokens=8,
                      stop=lambda row, tokens: tokens[-2:] == [7, 7])
    admitted = []

    def step(plan: StepPlan) -> np.ndarray:
        admitted.append(plan.admitted.tolist())
        return np.where(plan.rows == 1, 7, 20 + plan.rows)

    out = sched.run(step)
    assert admitted[:2] == [[0, 1], [2, 3]]
    assert out.tokens[1] == [7, 7] and out.finish[1] == "stop"
    assert out.finish[0] == out.finish[3] == "length" and len(out.tokens[0]) == 5
    # A prompt wider than the budget still runs, alone.
    wide = Scheduler(np.array([20, 20]), np.array([1, 1]), [], 2, prefill_tokens=8)
    assert wide.next_group() == [0]


# -- sampler -------------------------------------------------------------------------------

def test_sampler_is_greedy_at_temperature_zero(tmp_path):
    from lepton_batch.job.generation import resolve_generation
    from lepton_batch.job.spec import TaskSpec

    # The model asks for sampling; the job's temperature 0 makes it greedy.
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6}))
    settings = resolve_generation(tmp_path, TaskSpec(kind="generate", temperature=0), "text")
    sampling = Sampling(**settings.sampling_kwargs())
    assert not sampling.do_sample
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    tok = _tok([[3, 4, 5]] * 4)
    seeds = np.arange(4, dtype=np.int64)
    sampler = Sampler(sampling, tok, seeds, 4, 16, "cpu")
    new = sampler(logits, _plan(admitted=[0, 1, 2, 3], next_pos=[3, 3, 3, 3]))
    assert new.dtype == np.int64 and new.tolist() == logits.argmax(-1).tolist()


def test_sampler_is_deterministic_for_a_seed_whatever_the_slot():
    sampling = Sampling(do_sample=True, temperature=0.9, top_k=40, top_p=0.95,
                        repetition_penalty=1.2)
    n = 32
    tok = _tok([[3 + i, 4, 5] for i in range(n)])
    seeds = np.array([row_seed(7, i) for i in range(n)], dtype=np.int64)
    torch.manual_seed(1)
    logits = torch.randn(n, 60)

    def draw(seeds: np.ndarray, order: np.ndarray, generated: int = 0) -> np.ndarray:
        """Tokens of rows ``order`` admitted into slots 0.. (row i's logits: logits[i])."""
        sampler = Sampler(sampling, tok, seeds, n, 16, "cpu")
        plan = _plan(admitted=order, generated=np.full(n, generated), next_pos=np.full(n, 3))
        new = sampler(logits[order], plan)
        # The repetition penalty's history: the prompt, then the new token at its position.
        for s, r in enumerate(order):
            assert sampler.history[s, :4].tolist() == [3 + r, 4, 5, new[s]]
        out = np.empty(n, dtype=np.int64)
        out[order] = new
        return out

    first = draw(seeds, np.arange(n))
    assert np.array_equal(draw(seeds, np.arange(n)[::-1].copy()), first)  # another slot order
    assert (draw(seeds + 1, np.arange(n)) != first).sum() > n // 2  # the seed matters
    assert (draw(seeds, np.arange(n), generated=1) != first).sum() > n // 2  # and the step


# -- step runner ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tiny_llama):
    dec = Decoder(EngineConfig(str(tiny_llama), "causal_lm", dtype="float32", device="cpu",
                               max_length=256))
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return dec, plain


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    """The plain forward's float32 logits at the last of ``ids``, one row alone."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("common", [0, 6], ids=["no-prefix", "shared-prefix"])
def test_step_runner_matches_a_plain_forward(llama, graphs, common):
    dec, plain = llama
    gen = torch.Generator().manual_seed(2)
    head = torch.randint(3, 800, (common,), generator=gen).tolist()
    rows = [head + torch.randint(3, 800, (k,), generator=gen).tolist() for k in (7, 3, 11)]
    tok = _tok(rows)
    prefix = shared_prefix(tok)
    assert prefix == common
    stats = GenerateStats()
    with torch.inference_mode():  # as generate runs (the prefix is computed here)
        cache = KVCache(dec.stack, 3, 32, dec.dtype, dec.device)
        run = StepRunner(dec, tok, cache, prefix, stats, graphs=graphs)

    def check(logits: torch.Tensor, seqs: list[list[int]]) -> None:
        assert logits.shape == (len(seqs), 800) and logits.dtype == torch.float32
        for got, seq in zip(logits, seqs, strict=True):
            torch.testing.assert_close(got, _last_logits(plain, seq), atol=1e-4, rtol=1e-4)

    # A prefill of rows 0 and 1 into slots 0 and 1.
    with torch.inference_mode():
        logits = run(_plan(admitted=[0, 1]))
    check(logits, rows[:2])
    new = logits.argmax(-1).tolist()
    seqs = [rows[0] + [new[0]], rows[1] + [new[1]]]
    # Slots 0 and 1 decode while row 2 prefills into slot 2, in one forward.
    with torch.inference_mode():
        logits = run(_plan(last=new, pos=[len(r) for r in rows[:2]], admitted=[2]))
    check(logits, seqs + [rows[2]])
    new = logits.argmax(-1).tolist()
    seqs = [s + [t] for s, t in zip(seqs + [rows[2]], new, strict=True)]
    # A step that only decodes: static shapes when ``graphs`` (eager on CPU).
    with torch.inference_mode():
        logits = run(_plan(last=new, pos=[len(s) - 1 for s in seqs]))
    check(logits, seqs)
    assert stats.prefills == 2 and stats.sizes == [2, 1]
    assert stats.prompt_tokens == common + sum(len(r) - common for r in rows)
    assert stats.graph_steps == int(graphs)
