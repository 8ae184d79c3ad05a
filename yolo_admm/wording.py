"""Words for the command lines' messages."""
from __future__ import annotations


def counted(number: int, noun: str) -> str:
    """"1 image", "2 images", "0 images": `number` and `noun`, made plural by an "s" unless one."""
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"
