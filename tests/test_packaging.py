"""What a wheel or sdist carries: the package data each pretrained decoder needs, the licences, the tests'
helpers. An editable install reads src/ directly, so a file the patterns miss is only missing once built."""
from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
pytestmark = pytest.mark.skipif(not PYPROJECT.is_file(), reason="needs the source tree (pyproject.toml)")


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def test_every_pretrained_file_is_package_data():
    from fastdec.pretrained import PRETRAINED

    patterns = _project()["tool"]["setuptools"]["package-data"]["fastdec.pretrained"]
    folder = ROOT / "src" / "fastdec" / "pretrained"
    data = [p for p in folder.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    needed = {PRETRAINED[name].file for name in PRETRAINED} | {Path(PRETRAINED[n].file).with_suffix(".yaml").name
                                                               for n in PRETRAINED}
    assert needed <= {p.name for p in data}
    unshipped = [p.name for p in data if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    assert unshipped == [], f"add these to [tool.setuptools.package-data]: {unshipped}"


def test_the_licences_are_shipped_and_the_weights_carry_taesds_notice():
    project = _project()["project"]
    assert project["license"] == "MIT"
    for name in project["license-files"]:
        assert (ROOT / name).is_file(), name
    notice = (ROOT / "src" / "fastdec" / "pretrained" / "LICENSE.taesd").read_text()
    assert "TAEF2" in notice and "Copyright (c) 2023 Ollin Boer Bohan" in notice


def test_the_sdist_carries_what_the_tests_read():
    # setuptools puts only test*.py in an sdist: conftest.py, factories.py, ... were missing (16 test files failed to
    # import), and so were the scripts in benchmarks/ and tools/ that other tests run
    lines = [line.split() for line in (ROOT / "MANIFEST.in").read_text().splitlines() if line and line[0] != "#"]
    patterns = [p for words in lines if words[0] == "include" for p in words[1:]]
    grafted = {p for words in lines if words[0] == "graft" for p in words[1:]}
    helpers = [p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")]
    assert [h for h in helpers if not any(fnmatch.fnmatch(h, pat) for pat in patterns)] == []
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in ("src", "tests") and p.name[0] != "."}
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    read = {f for f in folders if re.search(rf"[\"']{f}[\"'/]", tests_text)}
    assert read and read <= grafted, f"graft these in MANIFEST.in: {sorted(read - grafted)}"
