"""Fixtures for the data-layer tests."""
from __future__ import annotations

import pytest
from datahelpers import make_items


@pytest.fixture
def items():
    return make_items()
