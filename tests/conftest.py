"""Suite-wide settings: bounded hypothesis runs, so CI stays fast on 2 cores."""

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fresh_auto_memory():
    """mode="auto" remembers per process what it learned about each f; every test starts
    with none of it, so tests do not depend on their order."""
    from hvpfunc._products import auto

    auto._OUTCOMES.clear()
    yield
    auto._OUTCOMES.clear()
