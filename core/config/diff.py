"""Comparing two experiments (or any nested tables): flattened to dotted keys, the keys whose values differ."""

from __future__ import annotations

from typing import Any


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"eval_after": {"loss": 1.0}}`` -> ``{"eval_after.loss": 1.0}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every key whose values differ (None where a side lacks it),
    in key order."""
    flat_a, flat_b = flatten(a), flatten(b)
    return [(key, flat_a.get(key), flat_b.get(key)) for key in sorted(flat_a.keys() | flat_b.keys())
            if flat_a.get(key) != flat_b.get(key)]


def describe(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The differences as ``key: old -> new`` lines."""
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in differences(a, b)]
