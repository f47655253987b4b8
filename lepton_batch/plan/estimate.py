"""Estimates made before a run, from a sample of the input: tokens per row (for the
``plan`` command) and each shard's work (for the progress bar's ETA). Loads a tokenizer,
never a model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from lepton_batch.job.task import DEFAULT_MAX_NEW_TOKENS
from lepton_batch.plan.build import Plan

log = logging.getLogger(__name__)


def estimate_tokens(plan: Plan, sample_rows: int = 2000) -> tuple[int, float]:
    """Estimate the tokens the job will run (after truncation), from a sample of rows.

    Loads the tokenizer only, never the model. Returns ``(total_estimate, mean_per_row)``.
    """
    from lepton_batch.job.shards import InputReadError, read_shards
    from lepton_batch.pipelines import prepare_text

    tok = _sample_tokenizer(plan)
    sampled = plan.shards[:: max(1, len(plan.shards) // 20)][:20]
    per_shard = max(1, sample_rows // max(1, len(sampled)))
    # a sample: one row group, or the first rows of a row range (the row ranges of one
    # large row group are then read in one pass, up to the last sample)
    sampled = [replace(s, num_rows=min(s.num_rows, per_shard)) if s.is_range
               else replace(s, row_groups=s.row_groups[:1]) for s in sampled]
    lengths: list[int] = []
    task = plan.job.task
    if task.uses_template:  # causal LMs: the rendered prompts
        from lepton_batch.job.spec import template_fields
        from lepton_batch.pipelines.prompts import render, template

        tmpl = template(task, plan.job.input.text_column)
        columns = template_fields(tmpl)
    else:
        columns = [plan.job.input.text_column]
    for _, table in read_shards(sampled, columns):
        if isinstance(table, InputReadError):
            raise table
        rows = table.slice(0, per_shard)
        if task.uses_template:
            texts = [p for p in render(rows, tmpl)[0] if p is not None]
        else:
            texts = plan.settings.apply(prepare_text(rows.column(0)).texts)
        if texts:
            lengths += tok(texts)
    mean = float(np.mean(lengths)) if lengths else 0.0
    return int(mean * plan.rows), mean


def _sample_tokenizer(plan: Plan) -> Callable[[list[str]], list[int]]:
    """texts -> token counts after truncation to ``max_length``, special tokens included.

    The model's ``tokenizer.json`` through the tokenizers library when there is one (no
    transformers import in the driver, which would pull in torch); else AutoTokenizer.
    """
    from lepton_batch.engine.tokens import file_tokenizer

    limit = plan.settings.max_length
    fast = file_tokenizer(plan.model.path, limit)
    if fast is not None:
        return lambda texts: [len(e.ids) for e in fast.encode_batch(texts)]
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(
        str(plan.model.path), trust_remote_code=plan.job.model.trust_remote_code)
    return lambda texts: [len(x) for x in slow(texts, truncation=True,
                                                max_length=limit)["input_ids"]]


def estimate_work(plan: Plan, rows: dict[str, np.ndarray] | None = None
                  ) -> dict[int, tuple[int, int]]:
    """Shard index -> (rows to compute, estimated tokens), for the progress bar's ETA.

    Row counts come from the Parquet footers (or ``rows``, an incremental run's positions
    per shard fingerprint); tokens per row from a tokenized sample (:func:`estimate_tokens`),
    plus ``max_new_tokens`` per row for generation. Without a usable tokenizer the estimate
    is per row, and the ETA still holds for rows of similar length.
    """
    try:
        _, mean = estimate_tokens(plan)
    except Exception as exc:  # only the ETA depends on it
        log.warning("no token estimate for the ETA (%s); counting rows instead", exc)
        mean = 1.0
    task = plan.job.task
    new_tokens = task.max_new_tokens if isinstance(task.max_new_tokens, int) else \
        DEFAULT_MAX_NEW_TOKENS  # per row from a column: the default as the estimate
    per_row = max(mean, 1.0) + (new_tokens if task.kind == "generate" else 0)
    out = {}
    for shard in plan.shards:
        n = shard.num_rows if rows is None else len(rows.get(shard.fingerprint, ()))
        if rows is None or shard.fingerprint in rows:
            out[shard.index] = (n, int(n * per_row))
    return out
