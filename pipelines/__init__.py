"""Task pipelines (installed as ``lepton_batch.pipelines``): prepare, engine call, finish."""

from __future__ import annotations

from lepton_batch.modeldir import ModelInfo
from lepton_batch.pipelines.classify import ClassifyPipeline
from lepton_batch.pipelines.embed import EmbedPipeline
from lepton_batch.pipelines.text import PreparedText, prepare_text
from lepton_batch.settings import Settings
from lepton_batch.spec import TaskSpec

Pipeline = EmbedPipeline | ClassifyPipeline


def make_pipeline(task: TaskSpec, info: ModelInfo, settings: Settings) -> Pipeline:
    """The pipeline for ``task.kind``; raises ValueError when the model cannot serve it.

    ``settings``: the resolved pooling, normalisation, prompt and lowercasing.
    """
    if task.kind == "embed":
        return EmbedPipeline(task, info, settings)
    return ClassifyPipeline(task, info, settings)


__all__ = ["ClassifyPipeline", "EmbedPipeline", "Pipeline", "PreparedText", "make_pipeline",
           "prepare_text"]
