"""The job fingerprint: what a part file was computed from.

It hashes the job file's parts that change output values together with the settings
resolved from the model directory, so it belongs to planning (the job schema alone cannot
know the resolved settings). Engine and cluster sections are left out: they change speed,
not values. The value must stay byte-identical across releases: manifests and part files
of earlier runs carry it, and resume and incremental runs match on it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import RESULTS_VERSION, JobSpec
from lepton_batch.job.task import LATER_FIELDS, RESOLVED_TASK_FIELDS


def task_payload(job: JobSpec) -> dict[str, Any]:
    """The task section as the fingerprint hashes it: an encoder task's resolved fields
    (pooling, prompt, ...) count through ``settings`` instead; a field added after jobs
    already ran counts only once set."""
    task = job.task.model_dump(
        exclude=set() if job.task.uses_template else RESOLVED_TASK_FIELDS)
    for name in LATER_FIELDS:  # unset: the fingerprint jobs had before the field existed
        if task.get(name) is None:
            task.pop(name, None)
    return task


def job_fingerprint(job: JobSpec, model_revision: str, settings: Settings) -> str:
    """Hash of everything that changes the output values; engine and cluster excluded.

    ``settings`` are the resolved values (job, else the model's own, else defaults), so
    a change to the model's settings files changes the fingerprint too.
    """
    payload = {
        "input": job.input.model_dump(exclude={"path", "rows_per_shard"}),
        "model": job.model.model_dump(exclude={"device", "max_length"}),
        "model_revision": model_revision,
        # A causal LM's prompt is a template the job states; nothing resolves it.
        "task": task_payload(job),
        "settings": settings.values(),
        "results_version": RESULTS_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
