"""A run: its lifecycle (lock, stage, shards on Dask, publish, report), the shard worker, the
cluster and its start-up, monitoring, progress, reports. The only folder importing
``distributed``."""
