"""The documentation holds together: a short README that links every docs/ page, and no
relative link, #anchor or example job file that points at nothing."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
DOCS = [README, *PAGES]

# [text](target) and ![alt](target), target up to the first space or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
JOB = re.compile(r"\bjobs/[\w.-]+\.ya?ml\b")


def _prose(text: str) -> str:
    """The text outside fenced code blocks, where a "[x](y)" is code, not a link."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *#*$",
                                                   _prose(page.read_text()), re.M)}


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the reference goes in docs/"


def test_the_readme_links_every_docs_page():
    assert PAGES, "no docs/*.md pages"
    linked = {(REPO / t.split("#")[0]).resolve()
              for t in LINK.findall(_prose(README.read_text())) if "://" not in t}
    missing = [_name(p) for p in PAGES if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.exists() and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {_name(dest)}")
    assert not broken, f"{_name(page)}: {broken}"


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_every_job_file_named_exists(page):
    named = set(JOB.findall(page.read_text()))
    missing = sorted(j for j in named if not (REPO / j).is_file())
    assert not missing, f"{_name(page)} names {missing}, which do not exist"


def test_the_slug_follows_github():
    assert _slug("Scheduling: exit codes, cron, Airflow") == "scheduling-exit-codes-cron-airflow"
    assert _slug("On a GPU (H200, 2026-12-04)") == "on-a-gpu-h200-2026-12-04"
    assert _slug("Causal LMs: `generate`, `score`, likelihood `classify`") == \
        "causal-lms-generate-score-likelihood-classify"
    assert _slug("What happens when…") == "what-happens-when"


SOURCE = re.compile(r"(?<![\w/.-])((?:lepton_batch/)?[a-z_]+/[a-z_]+\.py)\b")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_source_file_a_page_names_exists(page):
    """A page that names a module (``run/worker.py``, ``lepton_batch/bench/embed.py``) names
    one that is there: the layout moves, the pages follow."""
    missing = sorted({rel for rel in SOURCE.findall(page.read_text())
                      if not (REPO / rel).exists() and not (REPO / "lepton_batch" / rel).exists()})
    assert missing == []
