"""lepton-batch: batch offline inference for large text corpora.

From Python: ``lepton_batch.submit(job)`` runs a job (a path, a dict or a JobSpec) as
``lepton-batch submit`` does, ``lepton_batch.validate(job)`` plans it, and
``lepton_batch.read(output)`` returns its published rows as a polars LazyFrame, and
``lepton_batch.map_partitions(ddf, model=..., task=...)`` appends a task's columns to a Dask
DataFrame (docs/python-api.md)."""

from pathlib import Path

__version__ = "0.1.0"


def top_level_folder(init_file: str) -> list[str]:
    """The ``__path__`` of ``lepton_batch.kernels`` / ``lepton_batch.pipelines``.

    Their modules sit in the repository's top-level ``kernels/`` and ``pipelines/`` folders,
    which hold no ``__init__.py``, so that from the repository root (``python -m pytest``,
    ``python -m lepton_batch``, a notebook) ``import kernels`` finds Hugging Face's
    ``kernels`` distribution, which transformers imports, and never our folder. Each
    package's init is ``lepton_batch/<name>.py`` instead; a module with a ``__path__`` is a
    package. ``init_file``: that module's ``__file__``. Installed (a wheel, ``pip install
    .``), setuptools' package-dir put the folder beside it as ``lepton_batch/<name>/``; in a
    source checkout (editable install, or the root on ``sys.path``) it is the top-level one.
    """
    init = Path(init_file)
    installed = init.with_suffix("")
    return [str(installed if installed.is_dir() else init.parents[1] / init.stem)]


# The Python API (lepton_batch/api/), imported on first use: ``import lepton_batch`` stays
# light (no torch, Dask or polars), and ``lepton_batch.submit`` is there when asked for.
__all__ = ["Interrupted", "JobError", "OutputInUse", "RunFailed", "RunResult",
           "map_partitions", "read", "submit", "validate"]


def __getattr__(name: str) -> object:
    if name in __all__:
        import lepton_batch.api  # the one import of the root from a layer above it

        return getattr(lepton_batch.api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
