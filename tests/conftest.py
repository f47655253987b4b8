"""Fixtures: tiny random BERT models and a WordPiece tokenizer built offline, saved with
``save_pretrained`` and loaded back through the real ``from_pretrained(local_dir)`` path;
small Parquet corpora cut from the real sample corpus."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# rich fixes a console's width for good when COLUMNS is set as the console is made, and
# pytest-xdist starts its workers with COLUMNS=80: the CLI's console would then ignore the
# width a test gives CliRunner. Without it, each console reads COLUMNS when it prints.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
# One torch thread per process. The suite runs several pytest workers, each starting CLI
# subprocesses and Dask workers, on few cores: with a pool per core in every process, OpenMP
# threads spin-wait on each other (test_job + test_oom here: 209 s wall, 92 s CPU at the
# default; 70 s wall, 52 s CPU at one thread). LEPTON_BATCH_THREADS is what the engine reads;
# OMP_NUM_THREADS reaches subprocesses before they import torch.
os.environ.setdefault("LEPTON_BATCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["LEPTON_BATCH_THREADS"]))
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
LABELS = ["negative", "neutral", "positive"]


def sample_texts(n: int) -> list[str]:
    """The first ``n`` usable texts of the real sample corpus."""
    texts: list[str] = []
    for f in sorted(SAMPLES.glob("*.parquet")):
        texts += [t for t in pq.read_table(f)["text"].to_pylist() if t and t.strip()]
    return texts[:n]


def _tokenizer(path: Path) -> None:
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(sample_texts(400), vocab_size=600, min_frequency=1)
    BertTokenizerFast(tokenizer_object=wp._tokenizer, model_max_length=128).save_pretrained(path)


def _bert_config(vocab_size: int, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                      **extra)


def _save_tiny_model(path: Path, model_cls, seed: int, **config) -> Path:
    """Tokenizer + a randomly initialised ``model_cls`` saved with ``save_pretrained``."""
    from transformers import AutoTokenizer

    _tokenizer(path)
    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(path))
    model_cls(_bert_config(vocab, **config)).eval().save_pretrained(path)
    return path


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """``build(folder)`` once per test run, in a folder that stays: under pytest-xdist the
    workers share the run's base temp folder, and the first one to get there builds (the
    others wait on a file lock, then reuse it). ``build`` fills the folder it is given."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if XDIST_WORKER else base) / f"once-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A random BertModel + WordPiece tokenizer in a local directory (safetensors)."""
    from transformers import BertModel

    return built_once(tmp_path_factory, "tiny-bert",
                      lambda path: _save_tiny_model(path, BertModel, seed=0))


@pytest.fixture(scope="session")
def tiny_bert_cls(tmp_path_factory) -> Path:
    """A random BertForSequenceClassification with 3 named labels."""
    from transformers import BertForSequenceClassification

    return built_once(tmp_path_factory, "tiny-bert-cls", lambda path: _save_tiny_model(
        path, BertForSequenceClassification, seed=1,
        num_labels=3, id2label=dict(enumerate(LABELS)),
        label2id={v: i for i, v in enumerate(LABELS)},
    ))


def write_corpus(folder: Path, n_files: int = 3, rows: int = 45, group: int = 10,
                 bad: bool = True) -> list[dict]:
    """Parquet files cut from the sample corpus; returns all rows as dicts, in id order.

    With ``bad``, each file gets a null, an empty and a whitespace-only row.
    """
    folder.mkdir(parents=True, exist_ok=True)
    texts = sample_texts(n_files * rows)
    all_rows = []
    for f in range(n_files):
        chunk = texts[f * rows : (f + 1) * rows]
        if bad:
            chunk[3], chunk[7], chunk[12] = None, "", "  \n"
        ids = list(range(1000 * f, 1000 * f + len(chunk)))
        table = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(chunk, pa.string()),
                          "lang": pa.array(["en"] * len(chunk))})
        pq.write_table(table, folder / f"corpus-{f}.parquet", row_group_size=group)
        all_rows += [{"id": i, "text": t} for i, t in zip(ids, chunk, strict=True)]
    return all_rows


def write_job(path: Path, **sections) -> Path:
    """A job file; each keyword is a top-level section dict."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[dict]]:
    folder = tmp_path / "in"
    return folder, write_corpus(folder)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _save_causal(path: Path, model, bos: bool) -> Path:
    """A byte-level BPE tokenizer (``<s>`` first when ``bos``; a small chat template) and
    ``model``, saved with ``save_pretrained``."""
    from lepton_batch.bench.generate import train_bpe_tokenizer

    train_bpe_tokenizer(path, sample_texts(400), bos, chat_template=CHAT_TEMPLATE)
    model.eval().save_pretrained(path)
    return path


def tiny_llama_config(vocab: int = 800, **extra):
    from transformers import LlamaConfig

    # initializer_range 0.2: random logits with clear margins, so greedy picks are not
    # near-ties that float rounding could flip.
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, initializer_range=0.2, **extra)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random LlamaForCausalLM (grouped-query attention) + BPE tokenizer with BOS."""
    from transformers import LlamaForCausalLM

    def build(path: Path) -> None:
        torch.manual_seed(3)
        _save_causal(path, LlamaForCausalLM(tiny_llama_config()), bos=True)

    return built_once(tmp_path_factory, "tiny-llama", build)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A random GPT2LMHeadModel + byte-level BPE tokenizer (no BOS)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def build(path: Path) -> None:
        torch.manual_seed(4)
        config = GPT2Config(vocab_size=800, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            initializer_range=0.2)
        _save_causal(path, GPT2LMHeadModel(config), bos=False)

    return built_once(tmp_path_factory, "tiny-gpt2", build)


def invoke_cli(*args: object) -> tuple[int, str]:
    """The CLI in this process (typer's CliRunner) at 250 columns: exit code and output."""
    from typer.testing import CliRunner

    from lepton_batch.cli.app import app

    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    return res.exit_code, res.output


def table_rows(out: str, header: str) -> list[dict[str, str]]:
    """The rows of the rich table whose header line holds ``header``, as column -> cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line and "┃" in line)
    names = [c.strip() for c in lines[start].strip().strip("┃").split("┃")]
    rows = []
    for line in lines[start + 2:]:
        if not line.strip().startswith("│"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip().strip("│").split("│")),
                             strict=True)))
    return rows
