"""Read the tensor index of a ``.safetensors`` file without touching tensor data.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length ``N``, ``N`` bytes of JSON mapping tensor names to ``{dtype, shape, data_offsets}``
(plus an optional ``__metadata__`` of strings), then the data. We parse the header
ourselves because we need byte offsets (the Python API hides them), and we validate it
strictly: every malformed or truncated file becomes a :class:`CheckpointFormatError`.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ...errors import CheckpointFormatError
from ..strict_json import loads_strict
from .dtypes import DTYPE_BITS, dtype_nbytes
from .records import FileKind, SourceFile, TensorRecord, shape_overflows

# The reference implementation refuses headers above 100 MB; so do we, before reading.
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """Return ``(data_start, header_dict)`` of a safetensors file, validated as JSON."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(
                    f"truncated safetensors file ({size} bytes, no header length)", path=path)
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise CheckpointFormatError(
                    f"safetensors header length {n} is over the {MAX_HEADER_BYTES}-byte limit "
                    "(corrupted file, or not safetensors)", path=path)
            if 8 + n > size:
                raise CheckpointFormatError(
                    f"truncated safetensors file: header of {n} bytes but file has {size} bytes",
                    path=path)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointFormatError(f"cannot read: {e.strerror or e}", path=path) from e
    try:
        header = loads_strict(raw)
    except ValueError as e:
        raise CheckpointFormatError(f"malformed safetensors header: {e}", path=path) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError("malformed safetensors header: not a JSON object", path=path)
    return 8 + n, header


def read_safetensors(path: Path, *, model: str = "", rel_path: str | None = None) -> SourceFile:
    """Index a safetensors file: every tensor's dtype, shape and absolute byte range.

    Tensors come in file order (by offset). Raises :class:`CheckpointFormatError` on a
    malformed header, an unknown dtype, a length that disagrees with the shape,
    overlapping tensors, or tensor data past the end of the file.
    """
    path = Path(path)
    rel = rel_path if rel_path is not None else path.name
    data_start, header = read_safetensors_header(path)
    size = path.stat().st_size
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointFormatError("malformed safetensors header: __metadata__ must map "
                                    "strings to strings", path=path)
    tensors: list[TensorRecord] = []
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointFormatError(f"{where}: header entry is not an object", path=path)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise CheckpointFormatError(f"{where}: unknown dtype {dtype!r}", path=path)
        if not (isinstance(shape, list)
                and all(type(d) is int and 0 <= d < 1 << 64 for d in shape)):
            raise CheckpointFormatError(f"{where}: shape must be a list of non-negative "
                                        f"64-bit integers, got {shape!r}", path=path)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointFormatError(f"{where}: bad data_offsets {offsets!r}", path=path)
        begin, end = offsets
        shape_t = tuple(shape)
        if shape_overflows(shape_t):
            raise CheckpointFormatError(f"{where}: shape {list(shape_t)} is too large to load "
                                        "(over 2^59 elements, zeros counted as 1)", path=path)
        expected = dtype_nbytes(dtype, shape_t)
        if end - begin != expected:
            raise CheckpointFormatError(
                f"{where}: {end - begin} bytes stored but {dtype}{list(shape_t)} needs "
                f"{expected}", path=path)
        if data_start + end > size:
            raise CheckpointFormatError(
                f"{where}: data ends at byte {data_start + end}, past the end of the file "
                f"({size} bytes; truncated download?)", path=path)
        tensors.append(TensorRecord(model, rel, name, dtype, shape_t, data_start + begin,
                                    end - begin))
    tensors.sort(key=lambda t: (t.offset, t.length))
    check_no_overlap(tensors, path)
    info = {"metadata": metadata} if metadata else {}
    return SourceFile(rel, path, size, FileKind.SAFETENSORS, tensors, info)


def check_no_overlap(tensors: list[TensorRecord], path: Path) -> None:
    """Refuse tensors (sorted by offset) whose non-empty byte ranges overlap."""
    prev: TensorRecord | None = None
    for t in tensors:
        if t.length == 0:
            continue
        if prev is not None and t.offset < prev.end:
            raise CheckpointFormatError(
                f"tensors {prev.name!r} and {t.name!r} overlap in the file", path=path)
        prev = t
