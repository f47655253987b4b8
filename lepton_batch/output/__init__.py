"""The dataset on disk: layout, the sinks (Parquet, Delta) behind one protocol (sink.py),
manifest, lock, schema contract, readers. Imports only ``lepton_batch.job`` and the
filesystem helpers."""
