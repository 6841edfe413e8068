"""Shared test setup: deterministic seeds, a fast derandomized hypothesis profile, threads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fedng",
    derandomize=True,
    database=None,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fedng")


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    """Seeds torch before every test and restores the thread count a test may have changed."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
