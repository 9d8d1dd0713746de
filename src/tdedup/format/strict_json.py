"""Strict JSON for headers and manifests read from untrusted files.

Python's ``json`` accepts what RFC 8259 does not (``NaN``, ``Infinity``), keeps the last
of repeated keys, and recurses without bound. A safetensors header or a bundle manifest
that relies on any of these is malformed: it would read differently in another reader.
"""

from __future__ import annotations

import json


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def loads_strict(raw: bytes | str) -> object:
    """Parse JSON strictly; any problem is a :class:`ValueError` saying what it is
    (invalid UTF-8, bad syntax, a repeated key, NaN/Infinity, nesting too deep)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:  # crafted: thousands of nested brackets
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason})") from None
