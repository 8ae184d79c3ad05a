"""Darknet cfgs shipped with the project as package data.

- `demo-tiny.cfg`: the offline demo's detector for the generated shapes dataset (`data.synthetic`),
  a yolov3-tiny-like net at 160x160 with two heads; its header says how its anchors were fitted.
"""
from __future__ import annotations

from pathlib import Path

CFG_DIR = Path(__file__).resolve().parent
DEMO_CFG = "demo-tiny.cfg"


def cfg_path(name: str = DEMO_CFG) -> Path:
    """The path of a shipped cfg, e.g. `cfg_path("demo-tiny.cfg")`.

    Raises:
        FileNotFoundError: no shipped cfg has that name (the message lists those that exist).
    """
    path = CFG_DIR / name
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in CFG_DIR.glob("*.cfg")))
        raise FileNotFoundError(f"{path}: no shipped Darknet cfg named {name!r}; shipped: {shipped}")
    return path
