"""Repository-wide pytest policy: a skipped test fails the run unless its reason is allow-listed.

A skip can hide a broken feature (a missing dependency, a guard that fires too often), so every
allowed skip is listed here with why it is acceptable.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# reason substring -> why this skip is acceptable. Keep it short.
ALLOWED_SKIPS: dict[str, str] = {
    "needs CUDA": "GPU-only checks run on the device machine (benchmarks/results), never in CPU CI",
}

_disallowed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if not any(key in reason for key in ALLOWED_SKIPS):
        _disallowed.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _disallowed and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _disallowed:
        terminalreporter.section("skips not on the allow-list (conftest.py ALLOWED_SKIPS)")
        for line in _disallowed:
            terminalreporter.write_line(line)
