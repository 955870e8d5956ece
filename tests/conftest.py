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


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test: no timing or free memory
    chooses a basis size, a chunk size or a mode, so a run's products are fixed."""
    import torch

    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)
