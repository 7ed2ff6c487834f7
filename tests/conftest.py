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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: without it they are deselected (reported as such), never run to fail or skip
    silently. infra/gpu/check.sh runs them on a GPU machine."""
    if torch.cuda.is_available():
        return
    gpu = [i for i in items if i.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if not i.get_closest_marker("gpu")]
