"""The package's shape holds: every folder imports only the layers below it, there is no
import circle, the job layer loads no model stack, only ``run/`` imports Dask, and no
source file grows past ~400 lines. The rules and the picture in docs/import-graph.svg come
from the same reader, tools/import_graph.py."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _tool():
    path = REPO / "tools" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_import_goes_down_and_none_goes_round():
    assert _tool().problems() == []


def test_the_checker_sees_a_climbing_import_and_a_circle(tmp_path):
    tool = _tool()
    for rel, text in {
        "lepton_batch/__init__.py": "",
        "lepton_batch/job/__init__.py": "",
        "lepton_batch/job/spec.py": "from lepton_batch.run.worker import x\n",
        "lepton_batch/run/__init__.py": "",
        "lepton_batch/run/worker.py": ("import distributed\n"
                                       "from lepton_batch.run.cluster import y\n"),
        "lepton_batch/run/cluster.py": "from lepton_batch.run import worker\n",
        "lepton_batch/plan/__init__.py": "",
        "lepton_batch/plan/build.py": "def f():\n    import dask\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = tool.problems(tmp_path)
    assert ("lepton_batch.job.spec imports lepton_batch.run.worker: "
            "job/ may not import run/") in found
    assert "lepton_batch.plan.build imports dask: plan/ must not" in found
    assert "import circle: lepton_batch.run.cluster <-> lepton_batch.run.worker" in found
    assert not [p for p in found if "worker imports distributed" in p]  # run/ may


def test_the_picture_in_docs_is_the_current_graph():
    """docs/import-graph.svg is regenerated, not left behind: `make import-graph`."""
    assert (REPO / "docs" / "import-graph.svg").read_text() == _tool().svg(
        title=_tool().TITLE)


def test_no_source_file_over_400_lines():
    sources = [*(REPO / "lepton_batch").rglob("*.py"), *(REPO / "pipelines").glob("*.py"),
               *(REPO / "kernels").glob("*.py"), *(REPO / "tools").glob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in sources
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_folder_of_the_package_is_installed():
    """pyproject.toml lists its packages by name: a new folder missing there is missing from
    every wheel (the source checkout would not notice)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    folders = {".".join(p.parent.relative_to(REPO).parts)
               for p in (REPO / "lepton_batch").rglob("__init__.py")}
    assert folders <= listed, folders - listed
