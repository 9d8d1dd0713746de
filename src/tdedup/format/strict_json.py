"""Strict JSON for headers and manifests read from untrusted files.

Python's ``json`` accepts what RFC 8259 does not (``NaN``, ``Infinity``), keeps the last
of repeated keys, and recurses without bound. A safetensors header or a bundle manifest
that relies on any of these is malformed: it would read differently in another reader.
Nesting is bounded by :data:`MAX_DEPTH` (spec/FORMAT.md §12), so the limit is the same
for every reader whatever its stack (Python's own parser stops near 1000 levels).
"""

from __future__ import annotations

import json
import re

from .bundle.constants import MAX_JSON_DEPTH

#: Deepest nesting of arrays and objects any JSON tdedup reads may have (a manifest
#: needs 8; spec/FORMAT.md §2, §12).
MAX_DEPTH = MAX_JSON_DEPTH

#: The only way a parsed string can hold a lone surrogate: a ``\\uD800``-``\\uDFFF`` escape
#: (decoding the text as UTF-8 refuses encoded surrogates).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_document(doc: object, *, strings: bool = True) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and strings that are not Unicode text
    (a ``\\ud800`` escape decodes to a lone surrogate, which no file system path, UTF-8
    writer or terminal accepts: RFC 8259 §8.2, I-JSON). Iterative: no recursion.
    ``strings=False`` checks the nesting only (the text had no surrogate escape)."""
    stack = [(doc, 1)]
    kinds = (dict, list, str) if strings else (dict, list)
    while stack:
        node, level = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"string {node!r} holds a lone surrogate (not Unicode "
                                 "text)") from None
            continue
        if isinstance(node, dict):
            children = [*node.keys(), *node.values()]
        elif isinstance(node, list):
            children = node
        else:
            continue
        if level > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        stack.extend((c, level + 1) for c in children if isinstance(c, kinds))


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
        text = (bytes(raw).decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview))
                else raw)
        doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:  # crafted: thousands of nested brackets
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason})") from None
    # Visiting every string of a manifest cost a load ~2 ms; only an escape can make one bad.
    check_document(doc, strings=not isinstance(raw, (bytes, bytearray, memoryview))
                   or _SURROGATE_ESCAPE.search(text) is not None)
    return doc
