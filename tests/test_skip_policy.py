"""The skip policy of tests/conftest.py: under ``CI=true`` a skip is an error unless its reason starts with
"platform:" (a missing test extra or ../shared fails the run); elsewhere skips stay skips. And its helper that runs
permission checks as a user when the tests run as root."""

from __future__ import annotations

import os
from typing import Dict, Tuple

import conftest
import pytest
from conftest import call_unprivileged

pytest_plugins = ["pytester"]

MISSING_MODULE = "seg_test_extra_that_is_not_installed"

SKIPPING_TESTS = f"""
import pytest

def test_a_missing_module():
    pytest.importorskip("{MISSING_MODULE}", reason="the {MISSING_MODULE} test extra is needed")

def test_missing_shared_data(shared):
    shared("data", "camvid")

def test_a_skip_without_a_platform_reason():
    pytest.skip("not today")

def test_a_platform_skip():
    pytest.skip("platform: no CUDA device")

@pytest.mark.skipif(True, reason="platform: Linux only")
def test_a_platform_skip_mark():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_an_expected_failure():
    assert False

def test_a_pass():
    pass
"""

SKIPPING_MODULE = f"""
import pytest

pytest.importorskip("{MISSING_MODULE}")

def test_never_collected():
    pass
"""


@pytest.fixture
def run_with_policy(pytester, monkeypatch, tmp_path):
    """run_with_policy(source, ci) -> the hook recorder of running ``source`` under the repository's conftest, with
    ../shared pointing to an empty folder and CI=true or no CI variable."""
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "empty-shared")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # hypothesis' plugin alone costs seconds per run

    def run(source: str, ci: bool):
        if ci:
            monkeypatch.setenv("CI", "true")
        else:
            monkeypatch.delenv("CI", raising=False)
        pytester.makepyfile(test_policy=source)
        return pytester.inline_run("-p", "no:cacheprovider", plugins=[conftest])

    return run


def outcomes(recorder) -> Dict[str, Tuple[str, str]]:
    """Test name -> (outcome, message): its first phase that did not pass ("error" for a failed setup, "xfailed"
    for an expected failure), else ("passed", "")."""
    found: Dict[str, Tuple[str, str]] = {}
    for report in recorder.getreports("pytest_runtest_logreport"):
        name = report.nodeid.split("::")[-1]
        if report.passed:
            found.setdefault(name, ("passed", ""))
            continue
        if found.get(name, ("passed",))[0] != "passed":
            continue
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed"
        elif report.failed and report.when != "call":
            outcome = "error"
        found[name] = (outcome, str(report.longrepr))
    return found


def test_without_ci_skips_stay_skips(run_with_policy):
    recorder = run_with_policy(SKIPPING_TESTS, ci=False)
    assert {name: outcome for name, (outcome, _) in outcomes(recorder).items()} == {
        "test_a_missing_module": "skipped", "test_missing_shared_data": "skipped",
        "test_a_skip_without_a_platform_reason": "skipped", "test_a_platform_skip": "skipped",
        "test_a_platform_skip_mark": "skipped", "test_an_expected_failure": "xfailed", "test_a_pass": "passed"}
    assert recorder.ret == pytest.ExitCode.OK


def test_under_ci_missing_dependencies_and_unmarked_skips_fail(run_with_policy, tmp_path):
    recorder = run_with_policy(SKIPPING_TESTS, ci=True)
    found = outcomes(recorder)
    assert {name: outcome for name, (outcome, _) in found.items()} == {
        "test_a_missing_module": "failed", "test_missing_shared_data": "failed",
        "test_a_skip_without_a_platform_reason": "failed", "test_a_platform_skip": "skipped",
        "test_a_platform_skip_mark": "skipped", "test_an_expected_failure": "xfailed", "test_a_pass": "passed"}
    assert recorder.ret == pytest.ExitCode.TESTS_FAILED
    # Each failure says why and keeps the skip's reason.
    for name, reason in [("test_a_missing_module", f"the {MISSING_MODULE} test extra is needed"),
                         ("test_missing_shared_data", f"{tmp_path / 'empty-shared' / 'data' / 'camvid'} is absent"),
                         ("test_a_skip_without_a_platform_reason", "not today")]:
        message = found[name][1]
        assert message.startswith("skipped under CI=true") and reason in message, message
    assert "platform: no CUDA device" in found["test_a_platform_skip"][1]


@pytest.mark.parametrize("ci", [False, True])
def test_a_module_level_importorskip_fails_collection_only_under_ci(run_with_policy, ci):
    recorder = run_with_policy(SKIPPING_MODULE, ci=ci)
    [module] = [r for r in recorder.getreports("pytest_collectreport") if r.nodeid.endswith("test_policy.py")]
    assert module.outcome == ("failed" if ci else "skipped")
    assert f"could not import '{MISSING_MODULE}'" in str(module.longrepr)
    assert recorder.ret == (pytest.ExitCode.INTERRUPTED if ci else pytest.ExitCode.NO_TESTS_COLLECTED)
    assert not recorder.getreports("pytest_runtest_logreport")


def test_call_unprivileged_runs_without_root_and_brings_back_results_and_errors():
    assert call_unprivileged(os.geteuid) != 0
    assert call_unprivileged(sum, [1, 2, 3]) == 6
    with pytest.raises(ValueError, match="invalid literal"):
        call_unprivileged(int, "not a number")
