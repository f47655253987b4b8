"""A run's ``report.json`` as one self-contained HTML page: header, Bokeh plots, shard table.

The page embeds BokehJS inline (``bokeh.resources.INLINE``), so it opens offline and from an
object store with no CDN. Reports are best-effort: every key but ``run_id`` may be missing or
odd, and a section that cannot be drawn becomes a short note instead of an error. Bokeh is
imported inside the functions because it costs about a second and most runs never render.
"""

from __future__ import annotations

import html
import logging
import os
from itertools import pairwise
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 600, 300
NO_DATA = "no data in this report"
# the exceptions a malformed report.json can raise while a section is built
_BAD_DATA = (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError)

_STYLE = """<style>
body { font-family: system-ui, sans-serif; padding: 0 24px 24px; height: auto; }
table.lb { border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }
table.lb td, table.lb th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
table.lb th { background: #f2f2f2; }
</style>"""

# extends Bokeh's own page template; header and footer are HTML escaped by this module
_TEMPLATE = """{% extends "file.html.jinja" %}
{% block postamble %}{{ style }}{% endblock %}
{% block contents %}{{ header }}{{ super() }}{{ footer }}{% endblock %}"""


def _esc(value: Any) -> str:
    return "–" if value is None or value == "" else html.escape(str(value))


def _num(value: Any, digits: int = 0) -> str:
    """``2000`` -> ``2,000``; anything that is not a number is shown escaped as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _esc(value)
    return f"{value:,.{digits}f}"


def _pct(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, int | float) and not isinstance(value, bool) \
        else _esc(value)


def _efficiency(d: dict) -> float | None:
    """The stored padding efficiency, else tokens / padded_tokens when both are there."""
    eff, tokens, padded = d.get("padding_efficiency"), d.get("tokens"), d.get("padded_tokens")
    if isinstance(eff, int | float):
        return float(eff)
    if isinstance(tokens, int | float) and isinstance(padded, int | float) and padded > 0:
        return tokens / padded
    return None


def _header(r: dict) -> str:
    model = r.get("model")
    if isinstance(model, dict):
        model_text = f"{_esc(model.get('name'))} ({_esc(model.get('path'))})"
        model_text += "".join(f", {k} {_esc(model[k])}" for k in ("type", "revision") if k in model)
    else:
        model_text = _esc(model) + (f" ({_esc(r['model_path'])})" if r.get("model_path") else "")
    settings = r.get("settings")
    if isinstance(settings, dict):
        settings = ", ".join(f"{k}={v}" for k, v in settings.items())
    engines = r.get("engines")
    engines = engines if isinstance(engines, list) else [engines] if engines else []
    published = r.get("published")
    failures = r.get("failures") or {}
    rows = [
        ("job", _esc(r.get("job") or r.get("job_name"))), ("task", _esc(r.get("task"))),
        ("model", model_text), ("mode", _esc(r.get("mode"))),
        ("run date", _esc(r.get("run_date"))),
        ("started / finished", f"{_esc(r.get('started_at'))} / {_esc(r.get('finished_at'))}"),
        ("wall seconds", _num(r.get("seconds"), 1)),
        ("first batch after (s)", _num(r.get("first_batch_seconds"), 1)),
        ("rows", _num(r.get("rows"))),
        ("rows with errors", _num(r.get("error_rows"))), ("tokens", _num(r.get("tokens"))),
        ("rows/s", _num(r.get("rows_per_second"), 1)),
        ("tokens/s", _num(r.get("tokens_per_second"), 1)),
        ("padding efficiency", _pct(_efficiency(r))),
        ("shards run / skipped / failed", " / ".join(
            _num(r.get(k)) for k in ("shards_run", "shards_skipped", "shards_failed"))),
        ("published", "–" if published is None else "yes" if published else "no"),
        ("engines", "<br>".join(_esc(e) for e in engines) or "–"),
        ("settings", _esc(settings)),
    ]
    if isinstance(failures, dict) and failures:
        rows.append(("failures", "<br>".join(
            f"shard {_esc(k)}: {_esc(v)}" for k, v in failures.items())))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)  # v is escaped
    return (f"<h1>lepton-batch run {_esc(r.get('run_id'))}</h1>"
            f'<table class="lb">{body}</table><h2>Plots</h2>')


def _footer(r: dict) -> str:
    shards = r.get("shards")
    shards = [s for s in shards if isinstance(s, dict)] if isinstance(shards, list) else []
    out = "<h2>Shards</h2>"
    if shards:
        cols = ["index", "rows", "tokens", "padding efficiency", "error rows", "seconds",
                "worker", "finished_at"]
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{v}</td>" for v in (
                _esc(s.get("index")), _num(s.get("rows")), _num(s.get("tokens")),
                _pct(_efficiency(s)), _num(s.get("error_rows")), _num(s.get("seconds"), 2),
                _esc(s.get("worker")), _esc(s.get("finished_at")))) + "</tr>"
            for s in shards)
        out += f'<table class="lb"><tr>{head}</tr>{body}</table>'
    else:
        out += f"<p>Shards: {NO_DATA}.</p>"
    if r.get("dask_report"):
        link = Path(str(r["dask_report"])).name if isinstance(r["dask_report"], str) \
            else "dask-report.html"
        out += f'<p><a href="{html.escape(link)}">Dask performance report</a></p>'
    return out


def _note(title: str, text: str = NO_DATA) -> Any:
    from bokeh.models import Div

    return Div(text=f"<p>{html.escape(title)}: {html.escape(text)}.</p>", width=WIDTH)


def _figure(title: str, x_label: str, y_label: str, **kw: Any) -> Any:
    from bokeh.plotting import figure

    p = figure(title=title, width=WIDTH, height=HEIGHT, tools="pan,box_zoom,reset,save", **kw)
    p.xaxis.axis_label, p.yaxis.axis_label = x_label, y_label
    return p


def _throughput(r: dict) -> list:
    from bokeh.models import HoverTool, LinearAxis, Range1d

    samples = sorted((float(s["t"]), float(s.get("rows") or 0), float(s.get("tokens") or 0))
                     for s in r.get("throughput") or [])
    # The samples are cumulative counts, taken when a worker event or a finished shard
    # arrives (0.5 s apart at least); rates over intervals of a 40th of the run (1 s at
    # least) read as throughput instead of as the jitter of event arrival.
    window = max(1.0, (samples[-1][0] - samples[0][0]) / 40) if samples else 1.0
    kept = samples[:1]
    for sample in samples[1:]:
        if sample[0] - kept[-1][0] >= window:
            kept.append(sample)
        elif sample is samples[-1]:  # the end: merged into the last interval if short
            kept[-1 if len(kept) > 1 and sample[0] - kept[-1][0] < window / 2 else
                 len(kept):] = [sample]
    rates = [(t1, (r1 - r0) / (t1 - t0), (k1 - k0) / (t1 - t0))
             for (t0, r0, k0), (t1, r1, k1) in pairwise(kept) if t1 > t0]
    if not rates:
        return [_note("Throughput over time"), _note("Cumulative rows")]
    t, rows_s, tokens_s = (list(c) for c in zip(*rates, strict=True))
    p = _figure("Throughput over time (rows/s left, tokens/s right)", "seconds since start",
                "rows/s", y_range=Range1d(0, max(max(rows_s), 1) * 1.1))
    p.extra_y_ranges = {"tokens": Range1d(0, max(max(tokens_s), 1) * 1.1)}
    p.add_layout(LinearAxis(y_range_name="tokens", axis_label="tokens/s"), "right")
    data = {"t": t, "rows_s": rows_s, "tokens_s": tokens_s}
    line = p.line("t", "rows_s", source=data, color="#1f77b4", line_width=4, legend_label="rows/s")
    # dashed on top: with tokens per row steady the two curves coincide on their own axes
    p.line("t", "tokens_s", source=data, color="#ff7f0e", line_width=2, line_dash="dashed",
           y_range_name="tokens", legend_label="tokens/s")
    p.legend.location = "bottom_right"
    p.add_tools(HoverTool(renderers=[line], mode="vline", tooltips=[
        ("t", "@t{0.0} s"), ("rows/s", "@rows_s{0,0.0}"), ("tokens/s", "@tokens_s{0,0.0}")]))
    c = _figure("Cumulative rows", "seconds since start", "rows")
    cum = {"t": [s[0] for s in samples], "rows": [s[1] for s in samples]}
    line = c.line("t", "rows", source=cum, line_width=2)
    c.add_tools(HoverTool(renderers=[line], mode="vline",
                          tooltips=[("t", "@t{0.0} s"), ("rows", "@rows{0,0}")]))
    return [p, c]


def _lengths(r: dict) -> list:
    from bokeh.models import HoverTool

    hist = r.get("length_histogram") or {}
    width, counts = float(hist.get("bin_width") or 0), [int(c) for c in hist.get("counts") or []]
    if width <= 0 or not any(counts):
        return [_note("Sequence lengths")]
    left = [i * width for i in range(len(counts))]
    data = {"left": left, "right": [x + width for x in left], "count": counts,
            "label": [f"{x:g}-{x + width:g}" for x in left]}
    p = _figure("Sequence lengths (tokens per row)", "tokens", "rows")
    p.quad(left="left", right="right", top="count", bottom=0, source=data, line_color="white")
    p.add_tools(HoverTool(tooltips=[("tokens", "[@label)"), ("rows", "@count{0,0}")]))
    return [p]


def _padding(r: dict) -> list:
    from bokeh.models import HoverTool, Range1d, Span

    points = [(s.get("index", i), _efficiency(s)) for i, s in enumerate(r.get("shards") or [])]
    points = [(int(i), e) for i, e in points if e is not None]
    if not points:
        return [_note("Padding efficiency per shard")]
    overall = _efficiency(r)
    title = "Padding efficiency per shard"
    if overall is not None:
        title += f" (dashed line: run {overall:.1%})"
    p = _figure(title, "shard", "real tokens / padded tokens", y_range=Range1d(0, 1))
    data = {"shard": [i for i, _ in points], "eff": [e for _, e in points]}
    p.vbar(x="shard", top="eff", width=0.8, source=data)
    if overall is not None:
        p.add_layout(Span(location=overall, dimension="width", line_dash="dashed",
                          line_color="#d62728", line_width=2))
    p.add_tools(HoverTool(tooltips=[("shard", "@shard"), ("efficiency", "@eff{0.00%}")]))
    return [p]


def _batches(r: dict) -> list:
    from bokeh.models import HoverTool

    hist = r.get("batch_rows_histogram") or {}
    edges, counts = [int(e) for e in hist.get("edges") or []], hist.get("counts") or []
    counts = [int(c) for c in counts[:len(edges)]]
    if not any(counts):
        return [_note("Batch sizes")]
    used = [i for i, c in enumerate(counts) if c]  # the bins between the first and last used
    edges, counts = edges[used[0]:], counts[used[0]:used[-1] + 1]
    # edges are power-of-two lower bounds, so the last bin ends at twice its edge
    uppers = edges[1:len(counts)] + [edges[len(counts) - 1] * 2]
    labels = [str(lo) if hi - lo <= 1 else f"{lo}-{hi - 1}"
              for lo, hi in zip(edges, uppers, strict=False)]
    data = {"label": labels, "count": counts}
    p = _figure("Batch sizes (rows per batch)", "rows per batch", "batches", x_range=labels)
    p.vbar(x="label", top="count", width=0.8, source=data)
    p.add_tools(HoverTool(tooltips=[("rows per batch", "@label"), ("batches", "@count{0,0}")]))
    return [p]


def _errors(r: dict, top: int = 20) -> list:
    from bokeh.models import HoverTool

    errors = r.get("errors_by_message")
    if not isinstance(errors, dict) or not errors:
        # the row count decides when present: an empty tally next to 3 error rows is no data
        clean = r["error_rows"] == 0 if "error_rows" in r else isinstance(errors, dict)
        return [_note("Row errors by message", "no row errors" if clean else NO_DATA)]
    items = sorted(((str(m), int(n)) for m, n in errors.items()), key=lambda x: -x[1])[:top]
    labels: list[str] = []
    for m, _ in items:  # long messages are cut for the axis; a cut must stay a unique factor
        label = m if len(m) <= 50 else m[:47] + "..."
        labels.append(label if label not in labels else f"{label} ({len(labels)})")
    data = {"label": labels, "message": [m for m, _ in items], "rows": [n for _, n in items]}
    title = "Row errors by message" + (f" (top {top})" if len(errors) > top else "")
    p = _figure(title, "rows", "message", y_range=labels[::-1])
    p.hbar(y="label", right="rows", height=0.7, source=data, color="#d62728")
    p.add_tools(HoverTool(tooltips=[("message", "@message"), ("rows", "@rows{0,0}")]))
    return [p]


def _stages(r: dict) -> list:
    from bokeh.models import HoverTool
    from bokeh.palettes import Category10_10

    totals = {str(k): float(v) for k, v in (r.get("stages") or {}).items()}
    out = []
    if sum(totals.values()) > 0:
        names = sorted(totals, key=totals.get)
        whole = sum(totals.values())
        data = {"stage": names, "seconds": [totals[n] for n in names],
                "share": [totals[n] / whole for n in names]}
        p = _figure("Time per stage (all shards)", "seconds", "stage", y_range=names)
        p.hbar(y="stage", right="seconds", height=0.7, source=data, color="#2ca02c")
        p.add_tools(HoverTool(tooltips=[("stage", "@stage"), ("seconds", "@seconds{0.00}"),
                                        ("share", "@share{0.0%}")]))
        out.append(p)
    else:
        out.append(_note("Time per stage"))
    shards = [s for s in r.get("shards") or [] if isinstance(s, dict) and s.get("stages")]
    stages = list(dict.fromkeys(k for s in shards for k in s["stages"]))
    if not stages:
        return out + [_note("Time per stage per shard")]
    # "_shard" keeps the x column apart from any stage name
    data = {"_shard": [int(s.get("index", i)) for i, s in enumerate(shards)]}
    data |= {k: [float(s["stages"].get(k) or 0) for s in shards] for k in stages}
    colors = [Category10_10[i % 10] for i in range(len(stages))]
    p = _figure("Time per stage per shard", "shard", "seconds")
    p.vbar_stack(stages, x="_shard", width=0.8, color=colors, source=data, legend_label=stages)
    p.legend.location, p.legend.orientation = "top_left", "horizontal"
    p.legend.label_text_font_size = "8pt"
    p.add_tools(HoverTool(tooltips=[("shard", "@_shard"), ("stage", "$name"),
                                    ("seconds", "@$name{0.00}")]))
    return out + [p]


def render_html(report: dict) -> str:
    """The whole report page as an HTML string, BokehJS inline (no network needed to view)."""
    from bokeh.core.templates import get_env
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.resources import INLINE

    items: list = []
    for build in (_throughput, _lengths, _padding, _batches, _errors, _stages):
        try:
            items += build(report)
        except _BAD_DATA as e:  # one odd field loses one plot, not the report
            log.warning("report section %s not drawn: %r", build.__name__, e)
            items.append(_note(build.__name__.strip("_"), f"could not draw ({e!r})"))
    grid = column(*[row(*items[i:i + 2]) for i in range(0, len(items), 2)])
    title = f"lepton-batch run {report.get('run_id')}"
    return file_html(grid, INLINE, title, template=get_env().from_string(_TEMPLATE),
                     template_variables={"style": _STYLE, "header": _header(report),
                                         "footer": _footer(report)})


def write_html(report: dict, path: Path) -> None:
    """Render ``report`` to ``path``: written beside it first, then renamed into place, so a
    reader never sees half a page."""
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    os.replace(tmp, path)
