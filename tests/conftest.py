import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("ci")
# Most tests run tiny models, which are op-overhead bound: one intra-op thread is faster and
# does not oversubscribe CI's two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parts():
    """The recipe's instant random tiny backbone (8x VAE), built once per module."""
    from examples.tsdsr.tiny import random_backbone

    return random_backbone()
