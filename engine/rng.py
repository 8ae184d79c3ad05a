"""torch's, NumPy's and Python's random streams: seeding them, and saving them into checkpoints."""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_cpu_stream(seed: int) -> Iterator[None]:
    """Inside, torch's CPU stream starts from `seed` (to build a model with the same initial
    weights every time); after, every stream, CUDA's included, is as it was before."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)      # the CPU stream only: CUDA's are not reseeded
        yield


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch CPU and (when present) CUDA random states, as tensors and plain
    Python values only, so a checkpoint stays loadable with `torch.load(weights_only=True)`."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["bit_generator"], saved["keys"].cpu().numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
