"""lepton-batch from Python: validate the quickstart job, run it, read its rows back.

Run from the repository root:  python examples/python_api.py
(the MiniLM embedding job of jobs/quickstart.yaml over data/samples/, into a temporary
output directory; docs/python-api.md)
"""

import tempfile

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


if __name__ == "__main__":
    main()
