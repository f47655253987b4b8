"""Zero-shot classify by embeddings: label templates, softmax scores and ``min_score``
(issue 28), against a direct Hugging Face forward of the same tiny BERT."""

from __future__ import annotations

import io

import polars as pl
import torch
import torch.nn.functional as F
from conftest import sample_texts
from rich.console import Console
from test_job import _direct, _job, _read

from lepton_batch.job.spec import TaskSpec
from lepton_batch.run.lifecycle import run_job

LABELS = {"files": "files and directories", "net": "network sockets", "math": "numbers"}


def test_label_template_fills_every_label_text():
    task = TaskSpec(kind="classify", labels=LABELS, label_template="A post about {}.")
    assert task.label_texts() == (list(LABELS), [f"A post about {d}." for d in LABELS.values()])
    plain = TaskSpec(kind="classify", labels=["a", "b"], label_template="{{x}} is {}")
    assert plain.label_texts()[1] == ["{x} is a", "{x} is b"]


def test_softmax_scores_template_and_min_score(tmp_path, tiny_bert, corpus):
    _, rows = corpus
    texts = [r["text"] for r in rows if r["text"] and r["text"].strip()]
    template = "A post about {}."
    row_emb = F.normalize(_direct(tiny_bert, texts), dim=-1)
    label_emb = F.normalize(_direct(tiny_bert, [template.format(d) for d in LABELS.values()]),
                            dim=-1)
    probs = torch.softmax(row_emb @ label_emb.T / 0.02, dim=-1)
    top = probs.max(-1)
    # Between two neighbouring top scores near the median, where the gap is widest: about
    # half the rows fall below it, none within float noise of it.
    ranked = top.values.sort().values
    mid = len(ranked) // 2
    i = max(range(mid - 5, mid + 5), key=lambda j: ranked[j + 1] - ranked[j])
    min_score = float(ranked[i] + ranked[i + 1]) / 2
    plan = _job(tmp_path, tiny_bert, {
        "kind": "classify", "labels": LABELS, "top_k": 3, "label_template": template,
        "scores": "softmax", "softmax_temperature": 0.02, "min_score": min_score})
    assert run_job(plan).ok
    good = _read(plan).filter(pl.col("error").is_null())
    assert good.height == len(texts)
    torch.testing.assert_close(torch.tensor(good["score"].to_list()), top.values,
                               atol=1e-4, rtol=1e-4)
    for row_scores in good["scores"].to_list():
        assert abs(sum(row_scores) - 1) < 1e-4  # a distribution over the 3 labels
    names = list(LABELS)
    want = [names[i] if v >= min_score else None
            for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
    assert good["label"].to_list() == want
    below = sum(w is None for w in want)
    assert 0 < below < len(want)
    # Rows below min_score keep their ranking and are not errors.
    assert good.filter(pl.col("label").is_null())["labels"].list.len().to_list() == [3] * below

    # The submit summary counts them apart from errors.
    from lepton_batch.cli.submit import _label_counts

    out = io.StringIO()
    Console(file=out, width=200).print(_label_counts(plan))
    errors = _read(plan)["error"].is_not_null().sum()
    assert f"(below task.min_score) │ {below}" in out.getvalue()
    assert f"(error)                │ {errors}" in out.getvalue()


def test_cosine_is_the_default_and_a_template_changes_the_scores(tmp_path, tiny_bert):
    from conftest import write_corpus

    write_corpus(tmp_path / "in", n_files=1, rows=15, bad=False)
    plain = _job(tmp_path, tiny_bert, {"kind": "classify", "labels": LABELS})
    assert run_job(plain).ok
    cos = _read(plain)["score"]
    texts = sample_texts(15)
    row_emb = F.normalize(_direct(tiny_bert, texts), dim=-1)
    label_emb = F.normalize(_direct(tiny_bert, list(LABELS.values())), dim=-1)
    torch.testing.assert_close(torch.tensor(cos.to_list()), (row_emb @ label_emb.T).max(-1)
                               .values, atol=1e-5, rtol=1e-4)
