"""The exceptions ``lepton_batch.submit`` raises: each carries what the CLI prints for the
same failure (and each maps to one of its exit codes: 2, 2, 1, 130/143)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lepton_batch.job.spec import JobSpecError
from lepton_batch.output.lock import OutputLocked

if TYPE_CHECKING:
    from lepton_batch.run.lifecycle import RunResult


class JobError(JobSpecError):
    """The job (a file, a dict or ``set`` overrides), its run date or its output cannot be
    used. ``problems``: every problem, one line each, starting with the field it names
    (``task.top_k: ...``); ``fields``: those field names.

    >>> try:
    ...     lepton_batch.validate({"name": "x"})
    ... except lepton_batch.JobError as exc:
    ...     print(exc.fields)
    ['input', 'model', 'task', 'output']
    """

    @property
    def fields(self) -> list[str]:
        """The field each problem names (the text before its first ``:``)."""
        return [p.split(":", 1)[0] for p in self.problems]


class OutputInUse(OutputLocked):
    """Another lepton-batch run holds the output's writer lock. ``holder``: what its
    ``_lock`` file says (host, pid, run_id, since, command; empty if not yet written);
    ``output``: the output's root.

    >>> try:
    ...     lepton_batch.submit("jobs/quickstart.yaml")
    ... except lepton_batch.OutputInUse as exc:
    ...     print("busy:", exc.holder.get("run_id"))
    """

    def __init__(self, message: str, output: str, holder: dict) -> None:
        super().__init__(message)
        self.output = output
        self.holder = holder


class RunFailed(RuntimeError):
    """Some shard or input file failed: nothing was published, the finished shards are
    kept (staged), and submitting the same job again runs only the rest. ``failures``:
    shard key (or ``input <file>``) -> its cause; ``result``: the whole
    :class:`~lepton_batch.run.lifecycle.RunResult`.

    >>> try:
    ...     lepton_batch.submit(job)
    ... except lepton_batch.RunFailed as exc:
    ...     for shard, cause in exc.failures.items():
    ...         print(shard, cause)
    """

    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.failures = dict(result.failures)
        kept = result.skipped + len(result.records)
        super().__init__(f"{len(self.failures)} failure(s), not published; the {kept} "
                         "finished shard(s) are kept: fix the cause and submit again to run "
                         "only the rest. " + "; ".join(f"{k}: {v}"
                                                       for k, v in self.failures.items()))


class Interrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C (SIGINT) or SIGTERM, cleanly: the lock released, the
    cluster shut down, finished shards kept; submitting again resumes. A
    ``KeyboardInterrupt``, so code that handles Ctrl-C handles it. ``signal``: ``"SIGINT"``
    or ``"SIGTERM"``; ``exit_code``: 130 or 143, as the CLI exits.

    >>> try:
    ...     lepton_batch.submit(job)
    ... except lepton_batch.Interrupted as exc:
    ...     sys.exit(exc.exit_code)
    """

    def __init__(self, signal: str, exit_code: int, line: str) -> None:
        super().__init__(line)
        self.signal = signal
        self.exit_code = exit_code
