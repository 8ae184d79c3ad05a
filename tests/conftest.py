"""Shared fixtures. Tests that need the real data in ../shared/data skip cleanly where it is absent."""
from __future__ import annotations

import os
from pathlib import Path

# As yolo_admm.cli does, before torch is imported: spin-waiting OpenMP threads thrash a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("YOLO_ADMM_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is not present here)")
    return path


@pytest.fixture
def shared_data():
    return shared_path


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after. Tiny models run fastest so, and on a loaded
    2-core machine multi-threaded regions wait on busy cores. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
