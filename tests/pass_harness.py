"""pytest plugin of the pass-developer harness (registered by tests/conftest.py).

Fixtures: `check_pass` (lowering.testing.check_pass) and `pass_strategies` (hypothesis strategies).
On a failing test, every check it ran is summarised in a "pass harness" report section: matched
counts, max errors per dtype and size, and the graph diff of the pass.
"""

import pytest

from lowering import testing


@pytest.fixture
def check_pass():
    testing.LAST.clear()
    yield testing.check_pass
    testing.LAST.clear()


@pytest.fixture
def pass_strategies():
    return testing.strategies


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "check_pass" in getattr(item, "fixturenames", ()):
        parts = []
        for check in testing.LAST:
            parts.append(check.summary())
            for dtype in check.after:
                parts.append(f"diff ({dtype}):\n{check.diff(dtype) or '(no change)'}")
        if parts:
            report.sections.append(("pass harness", "\n".join(parts)))
