"""Import names: the top-level ``kernels/`` and ``pipelines/`` folders never shadow a
distribution of the same name (transformers >= 5.25 imports Hugging Face's ``kernels``),
and ``lepton_batch.kernels`` / ``lepton_batch.pipelines`` come from those folders in every
install form: the source tree (``make venv``'s editable install, or the repository root on
``sys.path``), a built wheel and a regular install of it.

Each check runs in a subprocess whose working directory is the repository root, as
``python -m pytest``, ``python -m lepton_batch`` and a notebook there have it;
``tests/test_minilm.py`` runs ``python -m lepton_batch submit jobs/quickstart.yaml`` there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

FOLDERS = ("kernels", "pipelines")


def _python(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=240, env={**os.environ, **env})
    print(f"$ python {' '.join(args)}  (in {cwd})\n{res.stdout}{res.stderr}")
    return res


def _lines(res: subprocess.CompletedProcess) -> list[str]:
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.split()


def _hugging_face_kernels() -> Path:
    """The ``__init__.py`` of the installed ``kernels`` distribution (the test extra pins it,
    so the checks below always run against it)."""
    return Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))


def test_root_imports_hugging_face_kernels():
    res = _python("-c", "import kernels, transformers; from transformers import BertModel; "
                        "print(kernels.__file__, transformers.__version__)")
    kernels_file, _ = _lines(res)
    assert Path(kernels_file) == _hugging_face_kernels(), f"kernels shadowed: {res}"


def test_top_level_folders_are_not_packages():
    code = ("import importlib.util as u\n"
            "for name in ('kernels', 'pipelines'):\n"
            "    s = u.find_spec(name)\n"
            "    print(name, s.origin if s and s.origin else 'no-regular-package')")
    found = dict(zip(*[iter(_lines(_python("-c", code)))] * 2, strict=True))
    for name in FOLDERS:
        assert not (REPO / name / "__init__.py").exists()
        # at most a namespace portion, which any regular package of that name outranks
        assert REPO / name not in Path(found[name]).parents, found
    assert Path(found["kernels"]) == _hugging_face_kernels()


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_source_tree_maps_the_folders_into_lepton_batch(cwd, tmp_path):
    code = ("import lepton_batch, lepton_batch.kernels as k, lepton_batch.pipelines as p\n"
            "import lepton_batch.kernels.int8, lepton_batch.pipelines.embed\n"
            "print(lepton_batch.__file__, *k.__path__, *p.__path__, k.varlen_attention.__module__,"
            " p.make_pipeline.__module__, lepton_batch.pipelines.embed.__file__)")
    init, kernels, pipelines, kmod, pmod, embed = _lines(
        _python("-c", code, cwd=REPO if cwd == "root" else tmp_path))
    assert Path(init) == REPO / "lepton_batch" / "__init__.py"
    assert (Path(kernels), Path(pipelines)) == (REPO / "kernels", REPO / "pipelines")
    assert (kmod, pmod) == ("lepton_batch.kernels.attention", "lepton_batch.pipelines")
    assert Path(embed) == REPO / "pipelines" / "embed.py"


def _sources(dest: Path) -> Path:
    """What a wheel is built from, copied so no build/ folder of the checkout is reused."""
    for name in ("lepton_batch", *FOLDERS):
        shutil.copytree(REPO / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    return dest


@pytest.mark.slow
def test_wheel_and_its_install_hold_the_folders_inside_lepton_batch(tmp_path):
    src = _sources(tmp_path / "src")
    pip = ("-m", "pip", "--disable-pip-version-check")
    _lines(_python(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                   "-w", str(tmp_path / "dist"), cwd=tmp_path))
    (wheel,) = (tmp_path / "dist").glob("lepton_batch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"lepton_batch/kernels.py", "lepton_batch/pipelines.py",
            "lepton_batch/kernels/attention.py", "lepton_batch/pipelines/embed.py"} <= set(names)
    assert not [n for n in names if n.startswith(("kernels/", "pipelines/"))], names
    assert not [n for n in names if n.endswith(("kernels/__init__.py", "pipelines/__init__.py"))]

    site = tmp_path / "site"  # a regular install of the wheel, imported from elsewhere
    _lines(_python(*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel),
                   cwd=tmp_path))
    code = ("import kernels, transformers, lepton_batch.kernels.int8, lepton_batch.run.worker\n"
            "import lepton_batch.kernels as k, lepton_batch.pipelines as p\n"
            "print(kernels.__file__, *k.__path__, *p.__path__, p.make_pipeline.__module__)")
    hf, kernels, pipelines, pmod = _lines(_python("-c", code, cwd=tmp_path,
                                                  PYTHONPATH=str(site)))
    assert Path(hf) == _hugging_face_kernels()
    assert (Path(kernels), Path(pipelines)) == (site / "lepton_batch" / "kernels",
                                                site / "lepton_batch" / "pipelines")
    assert pmod == "lepton_batch.pipelines"


@pytest.mark.slow
def test_python_m_pytest_from_the_root(tmp_path):
    """The suite's own entry point from the root, on tests that build and load BERT models
    through transformers (where its hub-kernels integration imports ``kernels``)."""
    res = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                  f"--basetemp={tmp_path / 'bt'}",
                  "tests/test_engine.py::test_truncation_is_flagged",
                  "tests/test_engine.py::test_logits_match_direct_forward")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout
