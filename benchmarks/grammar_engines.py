"""Which grammar engine constrains ``generate``: llguidance or xgrammar, measured.

Not part of the suite or the install: it compares the two libraries lepton-batch could build
structured output on, on this machine, with the same tokenizer, schema and token paths.
Run it with both installed beside the venv (xgrammar is not a dependency):

    .venv/bin/python -m pip install --target /tmp/gram --no-deps xgrammar apache-tvm-ffi
    PYTHONPATH=/tmp/gram .venv/bin/python benchmarks/grammar_engines.py

It trains a 32k byte-level BPE tokenizer on the shipped samples (no hub here), compiles the
schema of ``jobs/extract.yaml`` for it, and walks 64 matchers in lock step along
64 valid JSON answers, computing every step's bitmask for the whole batch as the engine
does. Printed: compile time, and mask time per step (median of the steps) for the batch.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "data/samples/doc_facts.schema.json").read_text())
BATCH = 64


def tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").exists():
        texts = pq.read_table(sorted((ROOT / "data/samples").glob("*.parquet")))["text"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator((t for t in texts.to_pylist() if t), trainers.BpeTrainer(
            vocab_size=32000, special_tokens=["</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def answers(n: int) -> list[str]:
    """n valid answers of the schema, compact as the engine decodes them."""
    rng = np.random.default_rng(0)
    subjects = ["socket.socket.connect", "json.dumps", "with", "pathlib.Path", "asyncio"]
    kinds = ["method", "function", "statement", "class", "module"]
    out = []
    for i in range(n):
        answer = {"subject": subjects[i % 5], "kind": kinds[i % 5],
                  "summary": "Connect the socket to a remote address and wait."[: 20 + i % 30]}
        if i % 2:
            answer["mentions"] = ["timeout", "OSError"][: 1 + i % 2]
        if i % 3:
            answer["deprecated"] = bool(rng.integers(2))
        out.append(json.dumps(answer, separators=(",", ":")))
    return out


def paths(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]


def run_llguidance(tok, walks: list[list[int]]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok)
    from lepton_batch.job.structured import grammar_text  # what the engine runs

    grammar = grammar_text({"type": "json_schema", "schema": SCHEMA})
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in walks]
    compile_s = time.perf_counter() - t0
    executor = llguidance.LLExecutor()
    mask = llguidance.torch.allocate_token_bitmask(len(walks), lltok.vocab_size)
    steps = []
    for step in range(max(map(len, walks))):
        live = [(m, i) for i, (m, w) in enumerate(zip(matchers, walks, strict=True))
                if step < len(w)]
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask_par(executor, live, mask)
        steps.append(time.perf_counter() - t)
        for m, i in live:
            assert m.consume_token(walks[i][step]), m.get_error()
    return compile_s, steps


def run_xgrammar(tok, walks: list[list[int]]) -> tuple[float, list[float]]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(  # compact, as ours
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"), strict_mode=True)
    matchers = [xgr.GrammarMatcher(compiled) for _ in walks]
    compile_s = time.perf_counter() - t0
    batch = xgr.BatchGrammarMatcher()
    mask = xgr.allocate_token_bitmask(len(walks), info.vocab_size)
    steps = []
    for step in range(max(map(len, walks))):
        live = [i for i, w in enumerate(walks) if step < len(w)]
        t = time.perf_counter()
        batch.batch_fill_next_token_bitmask([matchers[i] for i in live], mask[:len(live)])
        steps.append(time.perf_counter() - t)
        for i in live:
            assert matchers[i].accept_token(walks[i][step])
    return compile_s, steps


def main() -> None:
    torch.set_num_threads(2)
    tok = tokenizer(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/bpe32k"))
    walks = paths(tok, answers(BATCH))
    print(f"tokenizer: {len(tok)} tokens; {BATCH} answers of "
          f"{min(map(len, walks))}-{max(map(len, walks))} tokens")
    print("| engine | compile s | mask ms/step (batch 64), median | p90 |")
    print("|---|---|---|---|")
    for name, fn in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar)):
        compile_s, steps = fn(tok, walks)
        ms = sorted(s * 1000 for s in steps)
        print(f"| {name} | {compile_s:.3f} | {statistics.median(ms):.3f} | "
              f"{ms[int(0.9 * len(ms))]:.3f} |")


if __name__ == "__main__":
    main()
