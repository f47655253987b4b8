"""Start the embedded Dask cluster while the driver plans the run.

A fresh ``submit`` used to plan first (read footers, load a tokenizer, estimate tokens),
then start the cluster, and only then did the worker import torch and transformers and
load the model: several seconds in series before the first batch. Here the cluster starts
on a helper thread as soon as the job file is valid, and its workers begin their imports
at once (:func:`lepton_batch.run.cluster.warm_up`), so both overlap the planning.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dask.distributed import Client

    from lepton_batch.job.spec import ClusterSpec, JobSpec

log = logging.getLogger(__name__)


class EarlyCluster:
    """The embedded cluster, being started on a helper thread.

    ``client()`` waits for it; ``release()`` begins its shutdown once the run needs it no
    more (publishing and reports then overlap the workers' exit); ``close()`` waits for the
    shutdown and must always be called (a run that needs no cluster, or fails to plan,
    just closes it). The imports of Dask and of the cluster module happen on the helper
    thread too, off the driver's path.
    """

    def __init__(self, spec: ClusterSpec, model_dir: str) -> None:
        self._stack = contextlib.ExitStack()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lepton-cluster")
        self._future = self._pool.submit(self._start, spec, model_dir)
        self._closing: Future[None] | None = None

    @classmethod
    def for_job(cls, job: JobSpec) -> EarlyCluster:
        """The job's embedded cluster, being started, once no other run holds the output's
        lock (raises OutputLocked): a second submit is refused at once, not after starting
        a cluster that then meets the first one's dashboard port."""
        from lepton_batch.output.lock import check_free
        from lepton_batch.plan.build import resolve_output_root

        try:
            root = resolve_output_root(job.output.path, job.output.storage_options)
        except ValueError:  # planning names the problem
            root = None
        if root is not None:
            check_free(root)
        return cls(job.cluster, job.model.path)

    def _start(self, spec: ClusterSpec, model_dir: str) -> Client:
        from lepton_batch.run.cluster import open_client
        from lepton_batch.run.stopping import block_in_this_thread

        block_in_this_thread()  # its workers must not see a Ctrl-C before their preload

        return self._stack.enter_context(open_client(spec, warm=model_dir))

    def client(self) -> Client:
        """The started cluster's client; raises what starting it raised."""
        return self._future.result()

    def release(self) -> None:
        """Begin shutting the cluster down, without waiting. It runs on the thread that
        started it (Dask's client keeps its "current client" in a context variable of
        that thread), after the start has finished."""
        if self._closing is None:
            self._closing = self._pool.submit(self._stack.close)

    def close(self) -> None:
        """Shut the cluster down (see ``release``) and wait for it. Only warns: by now the
        run's outcome is decided."""
        self.release()
        try:
            self._future.result()
        except Exception as exc:  # a start that failed has nothing to close
            log.debug("early cluster start failed: %s", exc)
        try:
            self._closing.result()
        except Exception as exc:
            log.warning("could not shut the embedded cluster down cleanly: %s", exc)
        self._pool.shutdown()
