import os
import tempfile

import pytest
import torch

# Keep every test's caches out of the user's home, and CPU runs reproducible.
os.environ.setdefault("ANOMALYMOE_CACHE", os.path.join(tempfile.gettempdir(), "anomalymoe-test-cache"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_cfg():
    from anomalymoe.models.config import presets

    return presets()["test-tiny"]
