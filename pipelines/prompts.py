"""Prompts for causal-LM tasks: a template over the row's columns, or the chat template.

Every column a template names is checked per row: a null, an empty string or invalid
UTF-8 makes that row an error (the ``error`` column), never the shard.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lepton_batch.job.spec import TaskSpec, template_fields
from lepton_batch.pipelines.text import BINARY_TYPES, STRING_TYPES, PreparedText, check_value


def template(task: TaskSpec, text_column: str) -> str:
    """The job's prompt template; ``{<text_column>}`` when it gives none."""
    return task.prompt if task.prompt is not None else "{" + text_column + "}"


def render(table: pa.Table, tmpl: str) -> tuple[list[str | None], list[str | None]]:
    """(prompt or None, error or None) for every row of ``table``."""
    names = template_fields(tmpl)
    n = table.num_rows
    values: dict[str, list] = {}
    errors: list[str | None] = [None] * n
    for name in names:
        column = table[name]
        col = column.to_pylist()
        text_like = column.type in STRING_TYPES + BINARY_TYPES
        for i, value in enumerate(col):
            if errors[i] is not None:
                continue
            if text_like:
                value, problem = check_value(value)
                col[i] = value
                if problem is not None:
                    errors[i] = f"{name}: {problem}"
            elif value is None:
                errors[i] = f"{name}: null"
        values[name] = col
    prompts: list[str | None] = []
    for i in range(n):
        if errors[i] is not None:
            prompts.append(None)
            continue
        prompts.append(tmpl.format_map({name: values[name][i] for name in names}))
    return prompts, errors


def chat_prompts(tokenizer, prompts: list[str], system: str | None) -> list[str]:
    """Each prompt as a user turn (after ``system``) through the tokenizer's chat template,
    ending with the assistant's turn opened, as ``add_generation_prompt=True`` does."""
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else [])
        messages.append({"role": "user", "content": p})
        out.append(tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True))
    return out


def prepared(prompts: list[str | None], errors: list[str | None]) -> PreparedText:
    """The usable prompts with their shard positions, and every row's error."""
    valid = np.asarray([i for i, p in enumerate(prompts) if p is not None], dtype=np.int64)
    return PreparedText([p for p in prompts if p is not None], valid,
                        pa.array(errors, pa.string()))
