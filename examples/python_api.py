"""lepton-batch from Python: validate the quickstart job, run it, read its rows back,
then embed the same corpus as a Dask DataFrame with map_partitions and compare.

Run from the repository root:  python examples/python_api.py
(the MiniLM embedding job of jobs/quickstart.yaml over data/samples/, into a temporary
output directory; docs/python-api.md)
"""

import tempfile

import numpy as np

import lepton_batch


def main() -> None:
    out = tempfile.mkdtemp(prefix="lepton-batch-api-")
    job = "jobs/quickstart.yaml"
    overrides = [f"output.path={out}"]

    plan = lepton_batch.validate(job, set=overrides)  # no model loaded, no cluster
    print(f"plan: {plan.rows} rows in {len(plan.shards)} shards -> {plan.output_root}")
    print(f"columns: {', '.join(plan.schema.names)}")

    result = lepton_batch.submit(job, set=overrides)
    print(f"run {result.run_id}: {result.rows} rows ({result.error_rows} with errors), "
          f"{result.shards_run} shards run, {result.skipped} skipped, "
          f"{result.rows_per_second:,.0f} rows/s, published: {result.published}")
    print(f"report: {result.report_path}")

    again = lepton_batch.submit(job, set=overrides)  # mode resume: every shard is done
    print(f"again: {again.shards_run} shards run, {again.skipped} skipped")

    rows = lepton_batch.read(result.output).collect()
    print(f"read back: {rows.height} rows, embedding width {len(rows['embedding'][0])}")
    print(rows.select("id", "source", "num_tokens").sort("id").head(3))

    try:
        lepton_batch.validate(job, set=["task.kind=embedd"])
    except lepton_batch.JobError as exc:
        print(f"JobError on {exc.fields}: {exc.problems[0][:70]}")

    frame_example(plan.job, rows)


def frame_example(job, job_rows) -> None:
    """The same corpus as a Dask DataFrame: the embedding column appended on the workers
    of a Client by the job's model and engine settings, and compared with the job's rows
    (dtype auto is bfloat16 on CPUs with native bf16: batches cut differently round
    differently, so the values agree to bf16's precision, not bit for bit)."""
    import dask.dataframe as dd
    from dask.distributed import Client, LocalCluster

    ddf = dd.read_parquet("data/samples/*.parquet", columns=["id", "text"])
    out = lepton_batch.map_partitions(
        ddf, model=job.model.model_dump(exclude_unset=True), task="embed",
        text_column="text", engine=job.engine.model_dump(exclude_unset=True))
    print(f"map_partitions meta: {dict(out.dtypes.astype(str).tail(4))}")
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster, \
            Client(cluster):
        frame = out.compute().sort_values("id")
    ok = frame["error"].isna().to_numpy()
    job = job_rows.sort("id")
    assert frame["id"].tolist() == job["id"].to_list()
    same_errors = [e if isinstance(e, str) else None for e in frame["error"]] == (
        job["error"].to_list())
    ours = np.stack(frame["embedding"][ok].to_numpy())
    theirs = np.stack(job.filter(job["error"].is_null())["embedding"].to_list())
    cosine = (ours * theirs).sum(axis=1)  # both normalised
    print(f"map_partitions: {len(frame)} rows ({int((~ok).sum())} with errors, the same "
          f"as the job's: {same_errors}); vs the job's embeddings: max |difference| "
          f"{np.abs(ours - theirs).max():.3g}, min cosine {cosine.min():.6f}")


if __name__ == "__main__":
    main()
