"""Hooks shared by every test tier.

A test may skip on a developer's machine when a prerequisite (root, namespaces, v2ray...) is
missing, but a skipped test is a missing test: with TPROXYD_REQUIRE_ALL=1 (CI sets it) every skip,
at collection or in setup/call, is reported as a failure instead (docs/architecture.md, "Test tiers").
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ALL_ENV = "TPROXYD_REQUIRE_ALL"


def _require_all() -> bool:
    return os.environ.get(REQUIRE_ALL_ENV) == "1"


def _skip_reason(longrepr: object) -> str:
    # A skip's longrepr is (path, lineno, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _skip_to_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (_require_all() and report.skipped) or hasattr(report, "wasxfail"):
        return  # an expected failure (xfail) is reported as skipped too; it is not a missing test
    report.outcome = "failed"
    report.longrepr = f"{_skip_reason(report.longrepr)}\n[{REQUIRE_ALL_ENV}=1: a skipped test counts as a failure]"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    _skip_to_failure(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report: pytest.CollectReport = yield
    _skip_to_failure(report)
    return report
