"""The dataset on disk: layout, staging and publish, manifest, lock, schema contract, Delta,
readers. Imports only ``lepton_batch.job`` and the filesystem helpers."""
