"""Task pipelines: the package ``lepton_batch.pipelines``, whose modules are in the
repository's top-level ``pipelines/`` folder (see :func:`lepton_batch.top_level_folder`).

Each pipeline names the input ``columns`` it reads and its output ``fields()``, and runs a
shard in four steps: ``prepare(table)`` (usable texts, bad rows recorded),
``tokenize(engine, texts)``, ``run(engine, tok, spec, stats)`` (one Arrow array per output
field, in row order). ``head`` picks the engine: an encoder, or a causal LM. A pipeline
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
from lepton_batch.pipelines.text import PreparedText, prepare_text

Pipeline = (EmbedPipeline | ClassifyPipeline | GeneratePipeline | ScorePipeline
            | LikelihoodPipeline)


def encoder_task(task: TaskSpec) -> bool:
    """Whether ``task`` runs an encoder pipeline (embed; classify by a head or by
    embeddings): built, given its rows and able to tokenize them without importing torch
    or transformers (a worker does that while its warm-up imports them). The others build
    with transformers (a decoder's config, its chat template)."""
    return task.kind == "embed" or (task.kind == "classify" and task.method != "likelihood")


def make_pipeline(task: TaskSpec, info: ModelInfo, settings: Settings,
                  inp: InputSpec) -> Pipeline:
    """The pipeline for ``task.kind``; raises ValueError when the model cannot serve it.

    ``settings``: the resolved pooling, normalisation, prompt and lowercasing (encoders).
    """
    if task.kind == "embed":
        return EmbedPipeline(task, info, settings, inp)
    if encoder_task(task):
        if info.is_causal_lm and task.labels is not None and task.method is None:
            raise ValueError(f"task.method: {info.path.name} is a causal LM; set method: "
                             "likelihood to score each label as the prompt's continuation, "
                             "or method: embedding for zero-shot by embeddings")
        return ClassifyPipeline(task, info, settings, inp)
    if not info.is_causal_lm:
        arch = ", ".join(info.architectures) or "no architecture"
        raise ValueError(f"task.kind: {task.kind} needs a causal language model "
                         f"(*ForCausalLM); {info.path.name} is {arch}")
    if task.kind == "classify":
        return LikelihoodPipeline(task, info, inp)
    if task.kind == "generate":
        if task.max_new_tokens >= settings.max_length:
            raise ValueError(f"task.max_new_tokens: {task.max_new_tokens} leaves no room for a "
                             f"prompt in the model's context of {settings.max_length} tokens "
                             "(model.max_length)")
        return GeneratePipeline(task, info, inp, settings.max_length, settings.generation)
    return ScorePipeline(task, info, inp)


__all__ = ["ClassifyPipeline", "EmbedPipeline", "GeneratePipeline", "LikelihoodPipeline",
           "Pipeline",
           "PreparedText", "ScorePipeline", "encoder_task", "make_pipeline", "prepare_text"]
