"""Whether a dataset's classes fit a model: as many as its [yolo] layers predict, and, where both
carry names, the same names in the same order (a class index means one class to the model)."""
from __future__ import annotations

import os
from typing import Sequence

from data.sources import DetectionSource


def check_same_classes(names: Sequence[str] | None, names_from: str, other: Sequence[str] | None, other_from: str,
                       reordered_only: bool = False) -> None:
    """Raise ValueError naming both when `other` lists other class names than `names` (with
    `reordered_only`, only when they are the same names in another order: a model's classes read
    with names spelled otherwise, such as Darknet's coco.names against COCO's json, are not refused).
    Either None: nothing to compare."""
    if names is None or other is None or list(names) == list(other):
        return
    reordered = sorted(names) == sorted(other)
    if reordered_only and not reordered:
        return
    index = next((i for i, (a, b) in enumerate(zip(names, other)) if a != b), min(len(names), len(other)))
    found = repr(other[index]) if index < len(other) else "no class"
    expected = repr(names[index]) if index < len(names) else "no class"
    raise ValueError(f"{other_from}: class {index} is {found}, but {expected} in {names_from} "
                     f"({'the same classes in another order' if reordered else 'other classes'}); expected the "
                     f"classes of {names_from} in their order: a class index means one class to the model")


def check_classes(cfg_path: str | os.PathLike, num_classes: int, *sources: DetectionSource | None) -> None:
    """Raise ValueError naming the cfg when a dataset's number of classes is not the model's."""
    for source in sources:
        if source is not None and len(source.class_names) != num_classes:
            names = ", ".join(source.class_names[:5]) + (", ..." if len(source.class_names) > 5 else "")
            used = {int(c) for record in source.records for c in record.classes}
            unused = [name for index, name in enumerate(source.class_names) if index not in used]
            hint = ""
            if len(source.class_names) > num_classes and unused:
                hint = (f"; {len(unused)} of them label no object ({', '.join(unused[:3])}"
                        f"{', ...' if len(unused) > 3 else ''}), such as the supercategory a Roboflow COCO export "
                        f"lists first")
            raise ValueError(f"{cfg_path}: the model predicts {num_classes} classes but the dataset has "
                             f"{len(source.class_names)} ({names}); expected the same classes as the [yolo] "
                             f"layers{hint}")
