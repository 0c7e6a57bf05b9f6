"""Fixtures shared by the TSD-SR recipe tests."""

import pytest

from examples.tsdsr.tiny import Backbone, random_backbone


@pytest.fixture(scope="module")
def parts() -> Backbone:
    """The instant random tiny backbone (8x VAE), built once per module."""
    return random_backbone()
