"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    # Tests run tiny ops; with two OpenMP threads on a shared 2-core machine they wait on each
    # other (an overfit test went from 0.6 s to 14 s, measured). One thread is faster here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
