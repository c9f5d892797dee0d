"""The public API: ``mesh.__all__`` is sorted and every name in it imports."""

from __future__ import annotations

from typing import Any

import mesh


def test_all_is_sorted_without_duplicates() -> None:
    assert mesh.__all__, "the public API is empty"
    assert mesh.__all__ == sorted(set(mesh.__all__))


def test_every_name_in_all_is_importable_from_mesh() -> None:
    star: dict[str, Any] = {}
    exec("from mesh import *", star)  # raises AttributeError for a listed name that is missing
    for name in mesh.__all__:
        exec(f"from mesh import {name}", {})

    assert sorted(k for k in star if k != "__builtins__") == sorted(mesh.__all__)
