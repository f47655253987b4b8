"""Task pipelines: the package ``lepton_batch.pipelines``, whose modules are in the
repository's top-level ``pipelines/`` folder (see :func:`lepton_batch.top_level_folder`).

Each pipeline names the input ``columns`` it reads and its output ``fields()``, known
before it is built (``shape()``, all that planning uses), and runs a shard in four steps:
``prepare(table)`` (usable texts, bad rows recorded), ``tokenize(engine, texts)``,
``run(engine, tok, spec, stats)`` (one Arrow array per output field, in row order).
``head`` picks the engine: an encoder, or a causal LM. A pipeline
with ``chunkable = True`` keeps no state between ``tokenize`` and ``run``, so the runner may
call them chunk by chunk (``engine.tokenize_chunk_rows``).
"""

from __future__ import annotations

from lepton_batch import top_level_folder

__path__ = top_level_folder(__file__)

# Imported once __path__ is set: the submodules live in the folder it names.
from lepton_batch.job.modeldir import ModelInfo
from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import InputSpec, TaskSpec
from lepton_batch.pipelines.classify import ClassifyPipeline
from lepton_batch.pipelines.embed import EmbedPipeline
from lepton_batch.pipelines.generate import GeneratePipeline
from lepton_batch.pipelines.likelihood import LikelihoodPipeline
from lepton_batch.pipelines.score import ScorePipeline
from lepton_batch.pipelines.shape import TaskShape
from lepton_batch.pipelines.text import PreparedText, prepare_text

Pipeline = (EmbedPipeline | ClassifyPipeline | GeneratePipeline | ScorePipeline
            | LikelihoodPipeline)


def encoder_task(task: TaskSpec) -> bool:
    """Whether ``task`` runs an encoder pipeline (embed; classify by a head or by
    embeddings): built, given its rows and able to tokenize them without importing torch
    or transformers (a worker does that while its warm-up imports them). The others build
    with transformers (a decoder's config, its chat template)."""
    return task.kind == "embed" or (task.kind == "classify" and task.method != "likelihood")


def pipeline_class(task: TaskSpec, info: ModelInfo, settings: Settings) -> type[Pipeline]:
    """The pipeline class for ``task.kind``; raises ValueError when the model cannot serve
    it (an encoder for a causal-LM task, or the reverse; no room for a prompt)."""
    if task.kind == "embed":
        return EmbedPipeline
    if encoder_task(task):
        if info.is_causal_lm and task.labels is not None and task.method is None:
            raise ValueError(f"task.method: {info.path.name} is a causal LM; set method: "
                             "likelihood to score each label as the prompt's continuation, "
                             "or method: embedding for zero-shot by embeddings")
        return ClassifyPipeline
    if not info.is_causal_lm:
        arch = ", ".join(info.architectures) or "no architecture"
        raise ValueError(f"task.kind: {task.kind} needs a causal language model "
                         f"(*ForCausalLM); {info.path.name} is {arch}")
    if task.kind == "classify":
        return LikelihoodPipeline
    if task.kind == "generate":
        if isinstance(task.max_new_tokens, int) and task.max_new_tokens >= settings.max_length:
            raise ValueError(f"task.max_new_tokens: {task.max_new_tokens} leaves no room for a "
                             f"prompt in the model's context of {settings.max_length} tokens "
                             "(model.max_length)")
        return GeneratePipeline
    return ScorePipeline


def task_shape(task: TaskSpec, info: ModelInfo, settings: Settings,
               inp: InputSpec) -> TaskShape:
    """The task's engine head, input columns and output fields, without building its
    pipeline (planning needs no more); raises ValueError where :func:`make_pipeline` would."""
    return pipeline_class(task, info, settings).shape(task, info, settings, inp)


def make_pipeline(task: TaskSpec, info: ModelInfo, settings: Settings,
                  inp: InputSpec) -> Pipeline:
    """The pipeline for ``task.kind``; raises ValueError when the model cannot serve it.

    ``settings``: the resolved pooling, normalisation, prompt and lowercasing (encoders),
    the context (``max_length``) and the resolved sampling (generate).
    """
    return pipeline_class(task, info, settings)(task, info, settings, inp)


__all__ = ["ClassifyPipeline", "EmbedPipeline", "GeneratePipeline", "LikelihoodPipeline",
           "Pipeline", "PreparedText", "ScorePipeline", "TaskShape", "encoder_task",
           "make_pipeline", "pipeline_class", "prepare_text", "task_shape"]
