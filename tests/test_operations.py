"""Operating lepton-batch from a scheduler or a terminal (issue 28): SIGTERM and Ctrl-C
stop a real submit cleanly and the same command resumes; a second submit is refused
before it starts a cluster; output read from a log is not cut at 80 columns; --version and
--help.

The signal tests run the CLI in its own session with real Dask worker processes, as a
terminal, Airflow or systemd would; ``LEPTON_BATCH_FAULT_DELAY`` (faults.py) slows each
shard in the worker, so that the signal surely arrives mid-run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import polars as pl
import pytest
from conftest import built_once, write_corpus, write_job
from typer.testing import CliRunner

from lepton_batch.cli.app import app
from lepton_batch.faults import DELAY_ENV
from lepton_batch.output.dataset import init_output
from lepton_batch.output.lock import OutputLocked, check_free, output_lock
from lepton_batch.run.stopping import Terminated, deferred, held, sigterm_as_interrupt

ROWS = 135  # write_corpus: 3 files x 45 rows
KEPT = ("finished shards are kept (staged, not yet published); run the same command again "
        "to resume")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "ops-corpus", lambda f: write_corpus(f / "in")) / "in"


def _job(tmp_path: Path, model: Path, corpus: Path, dashboard: str = "127.0.0.1:0") -> Path:
    return write_job(
        tmp_path / "job.yaml",
        name="ops-job",
        input={"path": str(corpus), "rows_per_shard": 20},  # 9 shards
        model={"path": str(model), "max_length": 48, "dtype": "float32"},
        task={"kind": "embed"},
        engine={"max_tokens_per_batch": 256},
        output={"path": str(tmp_path / "out")},
        cluster={"processes": True, "n_workers": 1, "dashboard_address": dashboard,
                 "retries": 0},
    )


def _env(**extra: str) -> dict[str, str]:
    """The environment of a run whose output goes to a log: no COLUMNS, no terminal."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return env | extra


def _as_from_a_terminal() -> None:
    """The child starts as a terminal starts it: both stop signals at their default and
    unblocked. A process inherits an ignored or blocked signal from its parent (a background
    job of a non-interactive shell ignores SIGINT), and a full ``make test`` run once saw a
    Ctrl-C child finish its run as if it never got the signal."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))


def _signal_state(pid: int) -> str:
    """The kernel's view of a process's signals (masks in hex), for a failure message."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "(no /proc)"
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def _stop_mid_run(job: Path, sig: signal.Signals, group: bool) -> tuple[int, list[str], float]:
    """Start ``submit`` in its own session; once its first shard is done, send ``sig`` to
    it (``group``: to its whole process group, as a terminal's Ctrl-C or systemd does).
    Returns the exit code, every line it printed (stdout and stderr, in order) and the
    seconds from the signal to its exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lepton_batch", "submit", str(job), "--progress", "plain"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=_env(**{DELAY_ENV: "shard-computed:2"}), preexec_fn=_as_from_a_terminal)
    lines, sent = [], None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if sent is None and line.startswith("progress: shards 1/9"):
                lines.append(f"(test: sending {sig.name}; the driver's {_signal_state(proc.pid)})")
                (os.killpg if group else os.kill)(proc.pid, sig)
                sent = time.monotonic()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert sent is not None, "\n".join(lines)
    # printed once: rich prints a line again if a signal cuts its print short (deferred())
    assert sum(line.startswith("progress: shards 1/9") for line in lines) == 1, lines
    return code, lines, time.monotonic() - sent


def _dataset(root: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(root.glob("run_date=*/*.parquet")))


@pytest.mark.slow
def test_sigterm_mid_run_stops_cleanly_and_the_same_command_resumes(tmp_path, tiny_bert,
                                                                     corpus_dir):
    job = _job(tmp_path, tiny_bert, corpus_dir)
    code, lines, seconds = _stop_mid_run(job, signal.SIGTERM, group=False)
    out = "\n".join(lines)
    assert code == 143, out
    assert lines[-1] == f"terminated (SIGTERM): stopped cleanly; {KEPT}", out
    assert "leaked semaphore" not in out and "Traceback" not in out, out
    assert seconds < 30, seconds
    assert not list((tmp_path / "out").glob("run_date=*")), "nothing is published"

    rerun = subprocess.run([sys.executable, "-m", "lepton_batch", "submit", str(job)],
                           capture_output=True, text=True, timeout=240, env=_env())
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed = [line for line in rerun.stdout.splitlines() if line.startswith("resume: ")]
    assert resumed and int(resumed[0].split()[1]) >= 1, rerun.stdout  # N shard(s) skipped
    df = _dataset(tmp_path / "out")
    assert df.height == ROWS and df["id"].n_unique() == ROWS  # every id exactly once
    # 135 rows: too few for a padding efficiency that means anything (report.json has it)
    assert "padding efficiency" not in rerun.stdout


@pytest.mark.slow
def test_ctrl_c_prints_nothing_after_the_clean_line(tmp_path, tiny_bert, corpus_dir):
    """A terminal's Ctrl-C reaches the whole process group, Dask's worker processes too:
    they leave it to the driver (no nanny traceback under the message)."""
    code, lines, _ = _stop_mid_run(_job(tmp_path, tiny_bert, corpus_dir), signal.SIGINT,
                                   group=True)
    out = "\n".join(lines)
    assert code == 130, out
    assert lines[-1] == f"interrupted: stopped cleanly; {KEPT}", out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "CancelledError" not in out, out


def test_stop_signals_wait_while_held_and_sigterm_raises_terminated():
    me, before = os.getpid(), signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        with held() as arrived:  # e.g. the cluster's shutdown: nothing may cut it short
            os.kill(me, signal.SIGTERM)
            os.kill(me, signal.SIGINT)
            time.sleep(0.2)  # Python runs handlers between bytecodes
        assert arrived == [signal.SIGTERM, signal.SIGINT]
        with pytest.raises(Terminated):  # a KeyboardInterrupt: Ctrl-C's cleanups run
            os.kill(me, signal.SIGTERM)
            time.sleep(5)
        with pytest.raises(Terminated), deferred():  # delivered once the block is done
            os.kill(me, signal.SIGTERM)
            time.sleep(0.2)
            finished = True
        assert finished
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_submit_is_refused_before_it_starts_a_cluster(tmp_path, tiny_bert,
                                                                corpus_dir):
    """Before, the second submit planned, started a cluster (Dask: "Port 8787 is already
    in use", as the first run's dashboard holds it) and only then met the lock."""
    root = tmp_path / "out"
    init_output(root)
    with socket.socket() as taken:  # the first run's dashboard port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = _job(tmp_path, tiny_bert, corpus_dir, dashboard=f"127.0.0.1:{port}")
        with output_lock(root, "20261205T000000000-abcdef"):
            with pytest.raises(OutputLocked):
                check_free(root)
            started = time.monotonic()
            res = subprocess.run([sys.executable, "-m", "lepton_batch", "submit", str(job)],
                                 capture_output=True, text=True, timeout=120, env=_env())
            seconds = time.monotonic() - started
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "is being written by another lepton-batch run" in out
    assert "already in use" not in out  # no cluster was started
    assert "plan for job" not in out  # refused before planning, too
    assert seconds < 30, seconds
    check_free(root)  # released with its holder
    check_free(tmp_path / "never-written")  # no lock file: free


def test_output_to_a_log_is_not_cut_at_80_columns(tmp_path, tiny_bert, corpus_dir):
    job = _job(tmp_path, tiny_bert, corpus_dir)
    res = subprocess.run([sys.executable, "-m", "lepton_batch", "validate", str(job),
                          "--no-estimate"], capture_output=True, text=True, timeout=120,
                         env=_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(str(tmp_path / "out")) + 40 > 80  # the row would not fit 80 columns
    rows = [line for line in res.stdout.splitlines() if "output " in line and "mode" in line]
    assert len(rows) == 1 and f"{tmp_path / 'out'} (mode resume, partition run_date=" in rows[0]
    assert str(tiny_bert) in res.stdout  # the model's path whole, not cut with "…"


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output == f"lepton-batch {version('lepton-batch')}\n"


@pytest.mark.parametrize("command", ["submit", "validate", "status", "inspect", "bench"])
def test_help_names_values_not_python_types(command):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    text = res.output
    for typed in ("<bool>", "<list[str]>", "<str>", "<int>", "{job_file}", "{output}"):
        assert typed not in text, (typed, text)
    if command in ("submit", "validate"):
        usage = next(line.strip() for line in text.splitlines() if "Usage:" in line)
        assert usage.endswith(f" {command} [OPTIONS] JOB_FILE"), usage
        assert "--set" in text and "FIELD=VALUE" in text and "YYYY-MM-DD" in text
    if command == "submit":
        assert "rich|plain|none" in text and "143" in text


def test_top_level_help_lists_version():
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--version" in res.output and "<bool>" not in res.output


def test_top_level_help_is_a_short_front_door():
    """What it is, the five commands with a line each and one example; the rest is in each
    command's own --help and in docs/."""
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    lines = res.output.rstrip().splitlines()
    assert len(lines) <= 25, res.output
    listed = [line.strip("│ ").split()[0] for line in lines
              if line.startswith("│ ") and not line.startswith("│ --")]
    assert listed == ["submit", "validate", "inspect", "status", "bench"], res.output
    assert "lepton-batch submit jobs/quickstart.yaml" in res.output
    assert (Path(__file__).parents[1] / "jobs" / "quickstart.yaml").is_file()
    assert "oneDNN" not in res.output and "README.md" not in res.output


def test_only_the_command_line_prints_tables():
    """The readers return data; cli/ lays it out (rich)."""
    code = ("import sys; import lepton_batch.output.readers, lepton_batch.output.lock; "
            "print('rich' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stdout + res.stderr
