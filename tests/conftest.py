import os
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


# pytest.ini's default per-test timeout is for unit tests; an end-to-end or multi-rank test (its
# module's fixtures included, e.g. a training run every test of the module reads) gets this unless
# it sets its own.
SLOW_TIMEOUT_S = 900


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (still run in CI)")
    config.addinivalue_line("markers", "multirank: runs several ranks under torchrun")


def pytest_collection_modifyitems(config, items):
    for item in items:
        long = item.get_closest_marker("slow") or item.get_closest_marker("multirank")
        if long is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
