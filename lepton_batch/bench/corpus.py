"""The rows every method of a comparison runs: the first usable texts of a Parquet corpus."""

from __future__ import annotations


def load_rows(corpus: str, rows: int) -> tuple[list[str], str]:
    """The first ``rows`` usable texts of the corpus (repeated when it has fewer), and
    a note saying where they came from."""
    import pyarrow.parquet as pq

    from lepton_batch.job.shards import find_files
    from lepton_batch.pipelines import prepare_text

    fs, files = find_files(corpus)
    texts: list[str] = []
    for f in files:
        with fs.open(f, "rb") as fh:
            texts += prepare_text(pq.read_table(fh, columns=["text"]).column(0)).texts
        if len(texts) >= rows:
            break
    if not texts:
        raise ValueError(f"--corpus: {corpus} has no usable rows in column 'text'")
    note = f"corpus: {corpus} ({len(files)} file(s))"
    if len(texts) < rows:
        # Each copy is marked: submit computes identical rows of a shard once, and an
        # unmarked copy would let it skip most of the work the other methods do.
        note += f": {len(texts):,} usable rows, repeated to {rows:,} (copy k ends in \" (k)\")"
        texts = [t if k == 0 else f"{t} ({k})"
                 for k in range(rows // len(texts) + 1) for t in texts]
    return texts[: rows], note
