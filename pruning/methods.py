"""The pruning methods by name, as the command lines and pipelines offer them.

"admm-global" is Lee et al. 2023 (one budget over all prunable weights), "admm-layerwise" Zhang
et al. 2018 (a ratio per layer); "magnitude-global" and "magnitude-uniform" are the one-shot
baselines (`torch.nn.utils.prune.global_unstructured`, and the same ratio in every layer).
"""
from __future__ import annotations

from typing import NamedTuple


class Method(NamedTuple):
    """How a named method prunes."""

    kind: str   # "admm": train toward the constraint, then cut; "magnitude": cut at once
    scope: str  # a `pruning.SCOPES` value for "admm", a `pruning.MAGNITUDE_SCOPES` value for "magnitude"


METHODS: dict[str, Method] = {
    "admm-global": Method("admm", "global"),
    "admm-layerwise": Method("admm", "layerwise"),
    "magnitude-global": Method("magnitude", "global"),
    "magnitude-uniform": Method("magnitude", "uniform"),
}


def pruning_method(name: str) -> Method:
    """The method called `name`; ValueError listing the names otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]
