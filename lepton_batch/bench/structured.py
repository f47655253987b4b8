"""``lepton-batch bench --task generate --structured SCHEMA``: what the grammar costs.

The same prompts run twice per round in one process: constrained to the JSON schema (each
row ends where its JSON is complete, or at ``--max-new``), and unconstrained with each row's
new tokens planned to exactly what its constrained run made (end-of-sequence off), so both
compute the same tokens and the difference is the grammar: masks filled on llguidance's
threads, applied to the step's logits, tokens consumed. Greedy constrained rows are also
checked against an unbatched reference: the model one row at a time, each step's argmax
over the tokens the grammar allows (llguidance directly, not our engine's code).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lepton_batch.bench.common import dtype_name, pick_device, sync
from lepton_batch.bench.corpus import load_rows
from lepton_batch.bench.generate import GenConfig, GenMethod, GenResult, bench_decoder

PROMPT = ("Read the text and answer in JSON with the company (or project) it is about, "
          "the event, and its sentiment.\n\nText: {text}\n\nJSON: ")
CHECKED_ROWS = 8  # rows compared with the unbatched reference (it recomputes every step)


@torch.inference_mode()
def unbatched_reference(model, tokenizer, eos: list[int], vocab: int, ids: list[list[int]],
                        grammar: str, max_new: int) -> list[list[int]]:
    """Greedy constrained decoding one row at a time with a plain forward over the whole
    sequence each step: the reference a batched engine must reproduce."""
    import llguidance
    import llguidance.hf

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
    out = []
    for row in ids:
        matcher, seq, new = llguidance.LLMatcher(lltok, grammar), list(row), []
        while len(new) < max_new and not matcher.is_stopped():
            logits = model(torch.tensor([seq], device=model.device)).logits[0, -1].float()
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8),
                                 bitorder="little")[: len(logits)]
            allowed = np.zeros(len(logits), dtype=bool)
            allowed[: len(bits)] = bits.astype(bool)
            logits[torch.from_numpy(~allowed).to(logits.device)] = float("-inf")
            token = int(logits.argmax())
            if not matcher.consume_token(token):
                raise RuntimeError(matcher.get_error())
            seq.append(token)
            new.append(token)
            if token in eos:
                break
        out.append(new)
    return out


def run_structured_bench(cfg: GenConfig, schema_path: str,
                         say: Callable[[str], None]) -> GenResult:
    """Constrained against unconstrained generation, ``cfg.repeats`` rounds, same prompts
    and the same tokens per row."""
    from lepton_batch.engine import Tokenized
    from lepton_batch.engine.continuous import GenerateStats, Sampling, generate
    from lepton_batch.job.structured import ResponseFormat, grammar_text

    cfg.check()
    try:
        schema = json.loads(Path(schema_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--structured: cannot read a JSON schema from {schema_path}: "
                         f"{exc}") from None
    grammar = grammar_text(ResponseFormat.model_validate(
        {"type": "json_schema", "schema": schema}).resolved())
    device = pick_device(cfg.device)
    texts, _ = load_rows(cfg.corpus, cfg.rows)
    with tempfile.TemporaryDirectory(prefix="lepton-bench-json-") as tmp:
        dec, model_name = bench_decoder(cfg, texts, Path(tmp), device,
                                        cfg.max_prompt + cfg.max_new + 64, say)
        model_dir = dec.config.model_dir
        cut = [dec.tokenizer.decode(row[: cfg.max_prompt], skip_special_tokens=True)
               for row in dec.tokenizer(texts, verbose=False)["input_ids"]]
        ids = dec.tokenizer([PROMPT.format(text=t) for t in cut], verbose=False)["input_ids"]
        tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
        eos = dec.generation_config.eos_token_id
        seeds = np.zeros(len(ids), dtype=np.int64)
        limit = np.full(len(ids), cfg.max_new, dtype=np.int64)
        free = GenMethod("unconstrained", note="each row's tokens planned to its constrained "
                         "run's, end-of-sequence off")
        bound = GenMethod("json-schema", note="llguidance masks, whole step at once")
        say("warming up (both methods on a few rows, untimed)")
        few = Tokenized.from_lists(ids[: cfg.batch], np.zeros(min(cfg.batch, len(ids)), bool))
        for grammars in ([grammar] * len(few), None):
            generate(dec, few, limit[: len(few)], seeds[: len(few)], Sampling(), [], cfg.batch,
                     None, dec.token_budget(None), GenerateStats(), grammars=grammars)
        planned, tokens = None, None
        for rnd in range(cfg.repeats):
            for method in ((bound, free) if rnd % 2 == 0 or planned is None else (free, bound)):
                stats = GenerateStats()
                dec.generation_config.eos_token_id = eos if method is bound else []
                sync(device)
                start = time.perf_counter()
                if method is bound:
                    out = generate(dec, tok, limit, seeds, Sampling(), [], cfg.batch, None,
                                   dec.token_budget(None), stats,
                                   grammars=[grammar] * len(ids))
                else:
                    generate(dec, tok, planned, seeds, Sampling(), [], cfg.batch, None,
                             dec.token_budget(None), stats)
                sync(device)
                method.seconds.append(time.perf_counter() - start)
                method.computed_tokens = stats.slot_steps + len(ids)
                if method is bound:
                    tokens = out.tokens
                    planned = np.array([len(t) for t in tokens], dtype=np.int64)
                say(f"round {rnd + 1}: {method.name} {method.seconds[-1]:.2f} s")
        dec.generation_config.eos_token_id = eos
        useful = int(planned.sum())
        free.useful_tokens = bound.useful_tokens = useful
        say(f"checking {CHECKED_ROWS} rows against the unbatched reference")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dec.dtype).to(device)
        reference = unbatched_reference(model.eval(), dec.tokenizer, dec.eos_ids(),
                                        dec.vocab_size, ids[:CHECKED_ROWS], grammar,
                                        cfg.max_new)
        same = sum(a == b for a, b in zip(reference, tokens, strict=False)) / len(reference)
        valid = sum(_parses(dec.tokenizer.decode(t, skip_special_tokens=True)) for t in tokens)
        bound.note += f"; {valid} of {len(tokens)} rows parse as JSON" + (
            " (the rest hit --max-new)" if valid < len(tokens) else "")
        return GenResult(config=cfg, device=device, dtype=dtype_name(dec.dtype),
                         model=model_name, prompts=len(ids),
                         prompt_tokens=int(tok.lengths.sum()), planned_tokens=useful,
                         methods=[free, bound], identical_rows=same)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
