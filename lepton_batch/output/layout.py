"""The output directory's names: the files and folders that are ours, the partition column.
Imports nothing: the lock, the sinks and the readers all spell these from here (see
dataset.py for the layout they make)."""

SUCCESS = "_SUCCESS"
RUNS_DIR = "_runs"
STAGING = "_staging"
JOURNAL = "_publish.json"
MARKER = "_lepton_batch.json"
LOCK = "_lock"
DELTA_LOG = "_delta_log"  # output.format delta: the table's log (delta.py)
PARTITION_COLUMN = "run_date"
PARTITION_GLOB = f"{PARTITION_COLUMN}=*"
PARTS_GLOB = f"{PARTITION_GLOB}/*.parquet"  # every published part, relative to root


class OutputError(ValueError):
    """The output directory cannot be used as asked."""
