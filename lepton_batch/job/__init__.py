"""The job: the job file (pydantic spec, safe YAML, ``--set``), the model directory and its own
settings, input discovery and shards. Imports no torch and no Dask."""
