"""The HTML run report: self-contained, complete, escaped, best-effort, and drawn by a browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_batch.run.report import render_html, write_html

TITLES = [
    "Throughput over time",
    "Cumulative rows",
    "Sequence lengths (tokens per row)",
    "Padding efficiency per shard",
    "Batch sizes (rows per batch)",
    "Row errors by message",
    "Time per stage (all shards)",
    "Time per stage per shard",
]


def full_report() -> dict:
    """A report.json like a real 4-shard run writes, with a throughput sample per second."""
    shards = [
        {"index": i, "rows": 500, "tokens": 37000 + 100 * i, "padded_tokens": 37500 + 200 * i,
         "padding_efficiency": round((37000 + 100 * i) / (37500 + 200 * i), 4),
         "error_rows": i % 2, "truncated_rows": 2, "batches": 9, "seconds": 6.1 + i / 10,
         "stages": {"read": 0.02, "tokenize": 0.1 + i / 50, "compute": 5.8, "write": 0.05},
         "worker": f"host:{1234 + i}", "finished_at": f"2026-11-27T04:15:{7 + 6 * i:02d}+00:00",
         "engine": "bfloat16 on cpu, packed"}
        for i in range(4)
    ]
    # nothing while the model loads, then a rate that wobbles
    rows = [0, 0, 0] + [min(2000, 87 * t + 10 * (t % 3)) for t in range(1, 24)]
    throughput = [{"t": float(t), "rows": n, "tokens": 74 * n} for t, n in enumerate(rows)]
    return {
        "run_id": "20261127T041500123-abc123", "job": "quickstart-embed",
        "job_fingerprint": "ab12cd34", "mode": "resume", "run_date": "2026-11-27",
        "shards_planned": 4, "shards_skipped": 0, "shards_run": 4, "shards_failed": 0,
        "failures": {}, "rows": 2000, "tokens": 148000, "padded_tokens": 150000,
        "error_rows": 3, "rows_deduplicated": 0, "seconds": 25.3, "rows_per_second": 79.1,
        "tokens_per_second": 5850.0, "published": True, "padding_efficiency": 0.9867,
        "started_at": "2026-11-27T04:15:00+00:00", "finished_at": "2026-11-27T04:15:25+00:00",
        "task": "embed",
        "model": {"name": "all-MiniLM-L6-v2", "path": "/x/y", "type": "bert", "revision": "abc"},
        "settings": {"max_length": 256, "pooling": "mean", "normalize": True},
        "engines": ["bfloat16 on cpu, packed; quality gate: cosine 0.9999 vs float32"],
        "stages": {"read": 0.1, "load": 3.2, "tokenize": 0.5, "compute": 20.1, "write": 0.2},
        "shards": shards, "throughput": throughput,
        "length_histogram": {"bin_width": 8, "counts": [0, 12, 40, 3, 60, 80, 25, 9, 2]},
        "batch_rows_histogram": {"edges": [1, 2, 4, 8, 16, 32, 64],
                                 "counts": [0, 0, 1, 2, 5, 9, 3]},
        "errors_by_message": {"empty text": 2, "invalid UTF-8": 1},
        "dask_report": "dask-report.html",
    }


def test_full_report_is_self_contained_and_complete(tmp_path):
    path = tmp_path / "report.html"
    write_html(full_report(), path)
    assert path.exists() and not path.with_suffix(".html.tmp").exists()
    page = path.read_text(encoding="utf-8")
    # BokehJS is inline: nothing is fetched from the network when the page opens
    assert "Bokeh" in page and "cdn.bokeh.org" not in page
    assert not re.search(r"<script[^>]*\ssrc=", page)
    assert "lepton-batch run 20261127T041500123-abc123" in page
    for text in ["quickstart-embed", "all-MiniLM-L6-v2 (/x/y)", "2,000", "148,000", "79.1",
                 "5,850.0", "98.67%", "4 / 0 / 0", "host:1235", "max_length=256",
                 "quality gate", '<a href="dask-report.html">', *TITLES]:
        assert text in page, text
    # batch bins are labelled by their row ranges, from the first used bin to the last
    for label in ['"4-7"', '"8-15"', '"64-127"']:
        assert label in page, label
    assert '"2-3"' not in page
    assert "no data in this report" not in page and "could not draw" not in page


def test_minimal_report_renders_notes():
    page = render_html({"run_id": "x"})
    assert "lepton-batch run x" in page
    for section in ["Throughput over time", "Sequence lengths", "Padding efficiency per shard",
                    "Batch sizes", "Row errors by message", "Time per stage", "Shards"]:
        assert f"{section}: no data in this report" in page, section
    assert "dask-report.html" not in page


def test_odd_values_lose_a_plot_not_the_report():
    page = render_html({"run_id": "y", "throughput": [{"t": "soon"}, {"t": None}],
                        "length_histogram": {"bin_width": 8, "counts": [1, None]},
                        "shards": [{"index": 0, "rows": "many"}, "junk"],
                        "errors_by_message": {}, "error_rows": 0, "stages": {"read": 0.0}})
    assert "could not draw" in page
    assert "no row errors" in page
    assert "many" in page  # shown as given in the shard table
    page = render_html({"run_id": "z", "shards": 5, "engines": "one engine", "model": "m",
                        "settings": '{"pooling": "cls"}', "failures": {"3": "worker lost"},
                        "published": False})
    for text in ["one engine", "<td>m</td>", "{&quot;pooling&quot;: &quot;cls&quot;}",
                 "shard 3: worker lost", "<td>no</td>", "Shards: no data in this report"]:
        assert text in page, text


def test_error_note_follows_the_row_count():
    assert "no row errors" in render_html({"run_id": "a", "errors_by_message": {}})
    page = render_html({"run_id": "b", "errors_by_message": {}, "error_rows": 3})
    assert "no row errors" not in page and "Row errors by message: no data" in page


def test_import_is_cheap():
    # bokeh costs about a second to import; only rendering may pay it
    code = "import sys, lepton_batch.run.report; assert 'bokeh' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_values_are_escaped():
    report = full_report() | {"job": "<script>alert(1)</script>",
                              "errors_by_message": {"<script>alert(2)</script>": 4}}
    page = render_html(report)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)


def _screenshot(browser: str, page: Path, shot: Path) -> dict:
    """Screenshot ``page`` in headless Chromium; count the pixels that are not near-white, the
    coloured ones and the distinct colours."""
    from PIL import Image

    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1400,2400",
                    "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri()],
                   check=True, timeout=90, capture_output=True)
    assert shot.exists(), f"Chromium wrote no screenshot of {page}"
    image = Image.open(shot).convert("RGB")
    pixels = list(image.getdata())
    inked = sum(1 for p in pixels if min(p) < 235)
    # saturated pixels: bars and lines are coloured, the text-only page is grey on white
    coloured = sum(1 for r, g, b in pixels if max(r, g, b) - min(r, g, b) > 60)
    return {"inked": inked, "coloured": coloured, "colours": len(set(pixels))}


@pytest.mark.timeout(180)
def test_chromium_draws_the_plots(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed: apt-get install chromium to run this check")
    page = tmp_path / "report.html"
    write_html(full_report(), page)
    with_js = _screenshot(browser, page, tmp_path / "js.png")
    # the same page with no scripts, so no Bokeh canvas: header and tables only. (Chromium
    # 150's --screenshot writes nothing under --blink-settings=scriptEnabled=false.)
    text_only = tmp_path / "text-only.html"
    text_only.write_text(re.sub(r"<script\b.*?</script>", "", page.read_text(), flags=re.S))
    without_js = _screenshot(browser, text_only, tmp_path / "nojs.png")
    print(f"\nscreenshot with JS: {with_js}\nscreenshot without JS: {without_js}")
    # eight 600x300 plots add well over 100k drawn pixels and many coloured ones
    assert with_js["inked"] > without_js["inked"] + 100_000, (with_js, without_js)
    assert with_js["coloured"] > max(20_000, 10 * without_js["coloured"]), (with_js, without_js)
    assert with_js["colours"] > 2 * without_js["colours"], (with_js, without_js)
