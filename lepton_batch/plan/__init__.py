"""Everything decided before a model loads: the run's plan, the incremental row plan, the job
fingerprint, estimates. Imports no Dask."""
