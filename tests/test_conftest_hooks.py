"""The suite's own rules (tests/suite_rules.py, hooks loaded by tests/conftest.py), run on tiny test
files through pytester: an unmarked test that skips for want of CUDA fails, a marked one skips; under
CI=true a missing dependency fails the test, elsewhere it skips it."""

from __future__ import annotations

import pytest
import torch

from suite_rules import missing_dependency, require_or_skip

pytest_plugins = ["pytester"]

MISSING_MODULE = "headwise_test_module_that_does_not_exist"


@pytest.fixture
def run_with_rules(pytester, monkeypatch):
    """Run one test file (source text) in an inner session with the rules loaded; `cuda` says what
    ``torch.cuda.is_available()`` answers there (so these tests mean the same on a GPU machine)."""

    def run(source: str, cuda: bool = False) -> pytest.RunResult:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
        pytester.makepyfile(test_sample=source)
        return pytester.runpytest("-p", "suite_rules", "-p", "no:cacheprovider")

    return run


SKIPIF_CUDA = """
import pytest, torch

{marker}
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_gpu():
    torch.ones(1, device="cuda")
"""


def test_unmarked_test_skipping_for_cuda_fails(run_with_rules):
    result = run_with_rules(SKIPIF_CUDA.format(marker=""))
    result.assert_outcomes(errors=1)  # the skipif acts in setup: a failed setup is reported as an error
    result.stdout.fnmatch_lines(["*test_on_gpu skips for want of CUDA (*needs CUDA) but is not marked gpu*"])


def test_marked_test_skipping_for_cuda_is_a_skip(run_with_rules):
    run_with_rules(SKIPIF_CUDA.format(marker="@pytest.mark.gpu")).assert_outcomes(skipped=1)


def test_skip_raised_inside_an_unmarked_test_fails(run_with_rules):
    result = run_with_rules("""
import pytest

def test_probe():
    pytest.skip("CUDA graphs need a GPU")
""")
    result.assert_outcomes(failed=1)


def test_other_skips_and_xfails_are_left_alone(run_with_rules):
    run_with_rules("""
import pytest

@pytest.mark.skipif(True, reason="needs liger-kernel")
def test_optional():
    pass

@pytest.mark.xfail(reason="a known GPU driver bug", strict=True)
def test_known_bug():
    assert False
""").assert_outcomes(skipped=1, xfailed=1)


def test_with_cuda_a_skip_naming_a_gpu_is_not_a_missing_marker(run_with_rules):
    """A CPU-only check skipped on a GPU machine ("checks the message on a machine without a GPU")."""
    run_with_rules("""
import pytest

def test_cpu_message():
    pytest.skip("checks the message on a machine without a GPU")
""", cuda=True).assert_outcomes(skipped=1)


def test_module_skipping_as_a_whole_for_cuda_is_an_error(run_with_rules):
    result = run_with_rules("""
import pytest

pytest.skip("needs CUDA", allow_module_level=True)

def test_on_gpu():
    pass
""")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*skips as a whole for want of CUDA*"])


def test_require_or_skip_returns_an_installed_module(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_or_skip("json", "ships with Python").dumps([1]) == "[1]"


def test_missing_module_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING_MODULE):
        require_or_skip(MISSING_MODULE, "pip install it")


def test_missing_module_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"CI=true and a dependency of the suite is missing: {MISSING_MODULE}"):
        require_or_skip(MISSING_MODULE, "pip install it")
    with pytest.raises(pytest.fail.Exception, match="g\\+\\+ is not on PATH"):
        missing_dependency("g++ is not on PATH")


@pytest.mark.parametrize("ci, outcome", [("true", "failed"), ("false", "skipped"), (None, "skipped")])
def test_a_test_needing_a_missing_module(run_with_rules, monkeypatch, ci, outcome):
    """End to end: the test that needs the module fails under CI=true and only there."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    result = run_with_rules(f"""
from suite_rules import require_or_skip

def test_needs_it():
    require_or_skip("{MISSING_MODULE}", "pip install it")
""")
    result.assert_outcomes(**{outcome: 1})
