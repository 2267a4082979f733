"""What the published package carries besides code: the Apache-2.0 licence text its metadata names, and the PEP 561
marker that lets type checkers read headwise's type hints. Checked on the source tree and pyproject.toml (building a
wheel here would write build folders into the repository)."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# MD5 of https://www.apache.org/licenses/LICENSE-2.0.txt, the verbatim licence text.
APACHE_2_0_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_file_is_the_verbatim_apache_2_0_text_and_is_declared():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert hashlib.md5((REPO / "LICENSE").read_bytes()).hexdigest() == APACHE_2_0_MD5


def test_py_typed_marker_ships_with_the_package():
    assert (REPO / "headwise" / "py.typed").is_file()
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["headwise"]
