"""The package's import graph, read from the source (``ast``), never drawn by hand.

``python tools/import_graph.py``            writes docs/import-graph.svg (folders, the modules
                                             in each, arrows with import counts)
``python tools/import_graph.py --flat OUT``  one box per module instead of per folder (how the
                                             flat package of before the redesign was drawn)
``python tools/import_graph.py --check``    prints every import that breaks the layering
                                             (tests/test_layers.py runs the same check)

Every import counts: module level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter, defaultdict
from html import escape
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lepton_batch"

# A folder may import the folders listed here, and its own modules; nothing else of ours.
# "base": the package root's helpers (filesystem view, fault injection, package inits).
ALLOWED = {
    "cli": {"api", "bench", "run", "plan", "output", "job", "pipelines", "engine", "kernels",
            "base"},
    "api": {"run", "plan", "output", "job", "pipelines", "engine", "kernels", "base"},
    "bench": {"run", "plan", "output", "job", "pipelines", "engine", "kernels", "base"},
    "run": {"plan", "output", "job", "pipelines", "engine", "kernels", "base"},
    "plan": {"output", "job", "pipelines", "engine", "base"},
    "output": {"job", "base"},
    "job": {"base"},
    "pipelines": {"job", "engine", "base"},
    "engine": {"kernels", "base"},
    "kernels": {"base"},
    "base": set(),
}
# Third-party packages a folder must not import, even lazily.
FORBIDDEN_LIBS = {
    "job": {"torch", "transformers", "dask", "distributed"},
    "plan": {"dask", "distributed"},
    "output": {"dask", "distributed", "torch", "transformers"},
    "engine": {"dask", "distributed"},
    "pipelines": {"dask", "distributed"},
    "kernels": {"dask", "distributed"},
    "bench": {"dask", "distributed"},
    "cli": {"dask", "distributed"},
    "api": {"dask", "distributed"},
    "base": {"dask", "distributed", "torch", "transformers"},
}
# The one lazy import a layer may make of a library it otherwise must not, and why.
EXCEPTIONS = {
    ("lepton_batch.job.modeldir", "transformers"):
        "only when transformers' generated model-type table is not where transformers 5 "
        "keeps it: CONFIG_MAPPING itself is asked then",
}
# The one import a module may make of a layer above its own, and why (checked as ALLOWED).
UPWARD = {
    ("lepton_batch", "lepton_batch.api"):
        "the package root re-exports the Python API (lepton_batch.submit, ...) through a "
        "module __getattr__, imported on first use only, so `import lepton_batch` stays light",
}
# Layers top to bottom, for the picture.
ORDER = ["cli", "api", "bench", "run", "plan", "pipelines", "output", "engine", "job", "kernels",
         "base"]


def modules(repo: Path = REPO) -> dict[str, Path]:
    """Every module of the package, by dotted name, with its source file."""
    found: dict[str, Path] = {}
    for path in sorted((repo / PACKAGE).rglob("*.py")):
        rel = path.relative_to(repo).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    for folder in ("pipelines", "kernels"):  # installed as lepton_batch.<folder>
        for path in sorted((repo / folder).glob("*.py")):
            found[f"{PACKAGE}.{folder}.{path.stem}"] = path
    return found


def _imports(path: Path) -> tuple[list[str], list[str]]:
    """(our modules named by imports in ``path``, top-level third-party names)."""
    ours, libs = [], []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith(PACKAGE) else libs).append(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == PACKAGE:
                ours.append(node.module)
                ours.extend(f"{node.module}.{a.name}" for a in node.names)
            else:
                libs.append(node.module)
    return ours, [name.split(".")[0] for name in libs]


def edges(repo: Path = REPO) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> our modules it imports, module -> third-party packages it imports)."""
    mods = modules(repo)
    graph: dict[str, set[str]] = {}
    libs: dict[str, set[str]] = {}
    for name, path in mods.items():
        named, third = _imports(path)
        graph[name] = {n for n in named if n in mods and n != name}
        libs[name] = set(third)
    return graph, libs


def folder(module: str) -> str:
    """The layer a module belongs to."""
    parts = module.split(".")
    if module == f"{PACKAGE}.__main__":
        return "cli"
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    return "base"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_package_init(graph: dict[str, set[str]], a: str, b: str) -> bool:
    """``a`` is a package's init and ``b`` one of its own submodules (or the reverse): an
    init re-exporting its submodules is not a layering circle."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def problems(repo: Path = REPO) -> list[str]:
    """Every import that climbs, crosses sideways, forms a circle or pulls a forbidden
    library into a layer."""
    graph, libs = edges(repo)
    found = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = folder(src), folder(dst)
            if a != b and b not in ALLOWED[a] and (src, dst) not in UPWARD:
                found.append(f"{src} imports {dst}: {a}/ may not import {b}/")
        for lib in sorted(libs[src] & FORBIDDEN_LIBS.get(folder(src), set())):
            if (src, lib) not in EXCEPTIONS:
                found.append(f"{src} imports {lib}: {folder(src)}/ must not")
    pure = {m: {t for t in ts if not _is_package_init(graph, m, t)} for m, ts in graph.items()}
    for comp in cycles(pure):
        found.append("import circle: " + " <-> ".join(comp))
    return found


TITLE = ("lepton_batch: folders, their modules, and the imports between them "
         "(red: a circle or a forbidden import)")


# -- the picture --------------------------------------------------------------------------
BOX_W, LINE_H, GAP_X, GAP_Y, PAD = 210, 15, 40, 70, 8


def _layers(nodes: list[str], links: Counter, flat: bool) -> list[list[str]]:
    if not flat:
        return [[n] for n in ORDER if n in nodes]
    # flat: longest path from the top over the links without their circles
    rank = {n: 0 for n in nodes}
    for _ in range(len(nodes)):
        changed = False
        for (a, b) in links:
            if (b, a) in links:
                continue
            if rank[b] < rank[a] + 1 and rank[a] + 1 < len(nodes):
                rank[b] = rank[a] + 1
                changed = True
        if not changed:
            break
    layers: dict[int, list[str]] = defaultdict(list)
    for n in nodes:
        layers[rank[n]].append(n)
    return [sorted(layers[r]) for r in sorted(layers)]


def svg(repo: Path = REPO, flat: bool = False, title: str = "") -> str:
    graph, _ = edges(repo)
    group = (lambda m: m.split(".", 1)[1] if "." in m else m) if flat else folder
    members: dict[str, list[str]] = defaultdict(list)
    for m in graph:
        short = m.split(".")[-1] if m.count(".") >= 2 else "__init__"
        if m == f"{PACKAGE}.__main__":
            short = "__main__ (python -m)"
        elif group(m) == "base" and m.count(".") == 1:
            short = m.split(".")[-1]
        members[group(m)].append(short)
    links: Counter = Counter()
    for src, targets in graph.items():
        for dst in targets:
            if group(src) != group(dst):
                links[(group(src), group(dst))] += 1
    nodes = sorted(members)
    layers = _layers(nodes, links, flat)
    if not flat:  # two columns: the run chain left, the compute chain right
        right = {"pipelines", "engine", "kernels"}
        pos, y = {}, 60
        heights = {n: PAD * 2 + LINE_H * (1 + len(members[n])) for n in nodes}
        ys = {"left": 60, "right": 60}
        for (n,) in layers:
            side = "right" if n in right else "left"
            if n == "base":
                ys["left"] = ys["right"] = max(ys.values())
            x = 40 if side == "left" else 40 + BOX_W + 3 * GAP_X
            pos[n] = (x, ys[side])
            ys[side] += heights[n] + GAP_Y
            if n == "base":
                pos[n] = (40 + (BOX_W + 3 * GAP_X) // 2, ys["left"] - heights[n] - GAP_Y)
        width = max(2 * BOX_W + 3 * GAP_X + 80, int(9.5 * len(title)) + 40)
        height = max(y for _, y in pos.values()) + heights["base"] + 60
    else:
        heights = {n: PAD * 2 + LINE_H for n in nodes}
        pos, height, width = {}, 60, 0
        for layer in layers:
            for i, n in enumerate(layer):
                pos[n] = (40 + i * (BOX_W + GAP_X), height)
            width = max(width, 40 + len(layer) * (BOX_W + GAP_X))
            height += LINE_H + PAD * 2 + GAP_Y
    pure = {m: {t for t in ts if not _is_package_init(graph, m, t)} for m, ts in graph.items()}
    circles = [" <-> ".join(c) for c in cycles(pure)]
    note = "module import circles: " + ("; ".join(circles) if circles else "none")
    width = max(width, int(7.5 * len(note)) + 40)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="monospace" font-size="12">',
           '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
           '<marker id="r" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#c00"/>'
           '</marker></defs>',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="20" y="28" font-size="15">{escape(title)}</text>']
    for (a, b), count in sorted(links.items()):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        upward = not flat and (a, b) in {(folder(s), folder(d)) for s, d in UPWARD}
        wrong = not upward and ((b, a) in links or (not flat and b not in ALLOWED[a]))
        x1, y1 = xa + BOX_W / 2, ya + heights[a]
        x2, y2 = xb + BOX_W / 2, yb
        if yb < ya:  # points up the page
            x1, y1, x2, y2 = xa + BOX_W / 2 + 12, ya, xb + BOX_W / 2 + 12, yb + heights[b]
        if xa != xb and not flat:  # across the columns: side to side
            x1 = xa + (BOX_W if xb > xa else 0)
            x2 = xb + (0 if xb > xa else BOX_W)
            y1, y2 = ya + heights[a] / 2, yb + heights[b] / 2
        color = "#c00" if wrong else "#555"
        out.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                   f'stroke="{color}" stroke-opacity="0.6" '
                   f'marker-end="url(#{"r" if color == "#c00" else "a"})"/>')
        if not flat:
            out.append(f'<text x="{(x1 + x2) / 2 + 4:.0f}" y="{(y1 + y2) / 2:.0f}" '
                       f'fill="{color}">{count}</text>')
    for n in nodes:
        x, y = pos[n]
        label = "lepton_batch (root)" if n == "base" else n if flat else n + "/"
        out.append(f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{heights[n]}" rx="6" '
                   'fill="#eef3fb" stroke="#346"/>')
        out.append(f'<text x="{x + PAD}" y="{y + PAD + 11}" font-weight="bold">'
                   f'{escape(label)}</text>')
        if not flat:
            for i, m in enumerate(sorted(members[n])):
                out.append(f'<text x="{x + PAD + 10}" y="{y + PAD + 11 + LINE_H * (i + 1)}">'
                           f'{escape(m)}</text>')
    out.append(f'<text x="20" y="{height - 20}" fill="{"#c00" if circles else "#333"}">'
               f'{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        found = problems()
        print("\n".join(found) or "layering holds: no climbing import, no circle")
        return 1 if found else 0
    if argv[:1] == ["--flat"]:
        target = Path(argv[1])
        target.write_text(svg(flat=True, title="lepton_batch: one box per module"))
    else:
        target = REPO / "docs" / "import-graph.svg"
        target.write_text(svg(title=TITLE))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
