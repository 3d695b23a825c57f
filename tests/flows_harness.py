"""Shared session fixture for the flow tests: one Prefect test-harness server per test session.

Import it in a test module: ``from flows_harness import prefect_harness  # noqa: F401``. pytest
registers an imported fixture once per importing module, so the fixture starts the harness only the
first time (module-level flag) and the other registrations just yield inside it.
"""

from __future__ import annotations

import os

import pytest

_active = False


@pytest.fixture(scope="session")
def prefect_harness():
    global _active
    if _active:
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    # 60 s is plenty on an idle machine (7-10 s); a shared 2-core box under heavy load needs more
    timeout = int(os.environ.get("CELLM_PREFECT_STARTUP_TIMEOUT", "150"))
    _active = True
    try:
        with prefect_test_harness(server_startup_timeout=timeout):
            yield
    finally:
        _active = False
