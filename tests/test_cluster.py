"""The embedded LocalCluster: loopback only, worker environment fit for torch."""

from __future__ import annotations

import os

from lepton_batch.job.spec import ClusterSpec
from lepton_batch.run.cluster import open_client


def _env(name: str) -> str | None:
    return os.environ.get(name)


def _profiling() -> bool:
    import dask

    return dask.config.get("distributed.worker.profile.enabled")


def test_local_cluster_is_loopback_and_untrimmed(monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    spec = ClusterSpec(n_workers=1, dashboard_address="127.0.0.1:0")
    with open_client(spec) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        workers = client.scheduler_info()["workers"]
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in workers)
        # Dask's default MALLOC_TRIM_THRESHOLD_ slows torch on CPU by ~25%: not for us.
        assert set(client.run(_env, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
        # the statistical profiler is off in the worker processes (memory, see cluster.py)
        assert set(client.run(_profiling).values()) == {False}


def test_embedded_workers_drop_the_shutdown_heartbeat_error(caplog):
    """A finished run's shutdown may race a worker's heartbeat; Dask then logs an error
    with a traceback under the run's summary. Embedded workers drop that one line only."""
    import logging

    from lepton_batch.run.cluster import _quiet_worker_logs, _ShutdownRace

    log = logging.getLogger("distributed.worker")
    _quiet_worker_logs()
    _quiet_worker_logs()  # once per worker start; the filter is not stacked
    with caplog.at_level(logging.ERROR, logger="distributed.worker"):
        log.error("Failed to communicate with scheduler during heartbeat.")
        log.error("Compute Failed")
    assert [r.getMessage() for r in caplog.records] == ["Compute Failed"]
    assert sum(isinstance(f, _ShutdownRace) for f in log.filters) == 1


def test_thread_cluster_listens_on_loopback_only():
    import psutil

    before = {c.laddr for c in psutil.Process().net_connections() if c.status == "LISTEN"}
    spec = ClusterSpec(n_workers=1, processes=False, dashboard_address="127.0.0.1:0")
    with open_client(spec) as client:
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        listening = {c.laddr for c in psutil.Process().net_connections()
                     if c.status == "LISTEN"} - before
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def _warm_state() -> tuple[bool, bool]:
    """In a worker: every warm-up ended, and it got as far as importing transformers."""
    import sys

    from lepton_batch.run.cluster import _WARMING

    return all(done.is_set() for done in _WARMING), "transformers" in sys.modules


def test_early_cluster_warms_workers_and_closes(tiny_bert):
    """submit starts the cluster while it plans; its workers import the model's stack at
    once, and a task waits for that before it starts (see cluster.warm_up)."""
    from lepton_batch.run.cluster import _after_warm_up
    from lepton_batch.run.startup import EarlyCluster

    early = EarlyCluster(ClusterSpec(n_workers=1, dashboard_address="127.0.0.1:0"),
                         str(tiny_bert))
    try:
        client = early.client()
        worker = next(iter(client.scheduler_info()["workers"]))
        client.run(_after_warm_up, workers=[worker])
        assert client.run(_warm_state) == {worker: (True, True)}
        scheduler = client.scheduler.address
    finally:
        early.close()
    import pytest
    from distributed import Client

    with pytest.raises(OSError):  # the scheduler is gone
        Client(scheduler, timeout="2s")


def test_early_cluster_release_then_close(tiny_bert):
    """release() starts the shutdown without waiting (run_shards calls it once the tasks
    are done); close() waits for it, and both may be called again."""
    from lepton_batch.run.startup import EarlyCluster

    early = EarlyCluster(ClusterSpec(n_workers=1, dashboard_address="127.0.0.1:0"),
                         str(tiny_bert))
    scheduler = early.client().scheduler.address
    early.release()
    early.release()
    early.close()
    early.close()
    import pytest
    from distributed import Client

    with pytest.raises(OSError):  # the scheduler is gone
        Client(scheduler, timeout="2s")


def _tokenizer_env() -> tuple[str | None, str | None]:
    from lepton_batch.run.cluster import _ONE_THREAD

    return os.environ.get("TOKENIZERS_PARALLELISM"), os.environ.get(_ONE_THREAD)


def test_warm_up_tokenizer_thread(monkeypatch, tiny_bert):
    """On a two-core machine a warming worker starts with one tokenizer thread (the warm-up
    imports on the other core) and gets the pool back when the warm-up ends. A value the
    user set is theirs: it is neither replaced nor removed."""
    import dask

    from lepton_batch.run.cluster import _ONE_THREAD, _after_warm_up

    spec = ClusterSpec(n_workers=1, dashboard_address="127.0.0.1:0")
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with open_client(spec, warm=str(tiny_bert)) as client:
        spawned = dict(dask.config.get("distributed.nanny.environ"))  # workers start with it
        client.run(_after_warm_up)
        assert set(client.run(_tokenizer_env).values()) == {(None, None)}
    assert spawned["TOKENIZERS_PARALLELISM"] == "false" and spawned[_ONE_THREAD] == "1"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with open_client(spec, warm=str(tiny_bert)) as client:
        client.run(_after_warm_up)
        assert set(client.run(_tokenizer_env).values()) == {("true", None)}
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # more cores: the tokenizer keeps its pool
    with open_client(spec, warm=str(tiny_bert)) as client:
        assert "TOKENIZERS_PARALLELISM" not in dask.config.get("distributed.nanny.environ")
        assert set(client.run(_tokenizer_env).values()) == {(None, None)}
    assert _ONE_THREAD not in os.environ


def test_a_failed_warm_up_never_blocks_a_task(tmp_path):
    from lepton_batch.run.cluster import _WARMING, _after_warm_up, warm_up

    warm_up(str(tmp_path / "no-such-model"))
    _after_warm_up(timeout=120)
    assert _WARMING and all(done.is_set() for done in _WARMING)
