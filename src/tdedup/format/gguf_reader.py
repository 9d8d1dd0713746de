"""Read the tensor index of a ``.gguf`` file without parsing every metadata value.

``gguf.GGUFReader`` builds a numpy view of every metadata value; on a 49k-token
vocabulary that costs ~2 s per file while hashing all its tensors costs ~0.03 s
(measured on the corpus's SmolLM2 Q4_1, see bench/RESULTS.md). So this module walks the
header itself and *skips* metadata values it does not need, using gguf-py's on-disk
constants (value types, quantization types and their block sizes) rather than copies of
them. ``tests/test_gguf_reader.py`` checks that it agrees with ``GGUFReader``.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor count,
u64 key/value count, the key/values, the tensor infos (name, u32 n_dims, u64 dims
fastest-first, u32 ggml type, u64 offset relative to the data section), padding to
``general.alignment`` (default 32), then the data section.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import CheckpointFormatError
from .records import FileKind, SourceFile, TensorRecord
from .safetensors_reader import check_no_overlap

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# A GGUF split part: name-00001-of-00003.gguf (llama.cpp's gguf-split convention).
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<n>\d{5})\.gguf$")

# Fixed sizes of scalar value types, keyed by gguf-py's enum.
_SCALAR_FORMAT: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_SCALAR_SIZE = {k: struct.calcsize("<" + v) for k, v in _SCALAR_FORMAT.items()}
# Metadata we keep (cheap, small) for reports; everything else is skipped.
_KEPT_KEYS = {"general.architecture", "general.name", "general.alignment",
              "general.file_type", "split.count", "split.no"}
# Header reads grow in chunks; refuse absurd headers long before memory is at risk.
_MAX_STRING = 1 << 30


def ggml_type_name(type_id: int) -> str:
    return GGMLQuantizationType(type_id).name


def ggml_nbytes(type_id: int, n_elements: int) -> int:
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    return n_elements // block * type_size


class _Cursor:
    """Bounds-checked little-endian reads over the file, buffered in large chunks."""

    def __init__(self, f, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next read

    def _need(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointFormatError(
                f"truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, file has "
                f"{self.size}", path=self.path)
        start = self.pos - self.base
        if start + n > len(self.buf):
            self.f.seek(self.pos)
            self.buf = self.f.read(max(n, 1 << 20))
            self.base, start = self.pos, 0
        self.pos += n
        return memoryview(self.buf)[start:start + n]

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self._need(struct.calcsize("<" + fmt), what))

    def u32(self, what: str) -> int:
        return self.unpack("I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("Q", what)[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > _MAX_STRING:
            raise CheckpointFormatError(f"{what}: string length {n} is implausible "
                                        "(corrupted header)", path=self.path)
        raw = self._need(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointFormatError(f"{what}: not UTF-8 ({e.reason})", path=self.path) from e

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointFormatError(
                f"truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, file has "
                f"{self.size}", path=self.path)
        self.pos += n

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise CheckpointFormatError(f"{what}: unknown GGUF value type {raw}",
                                        path=self.path) from None

    def value(self, vtype: GGUFValueType, what: str, keep: bool):
        """Read (keep=True) or skip one value; returns the value or None."""
        if vtype in _SCALAR_FORMAT:
            if keep:
                return self.unpack(_SCALAR_FORMAT[vtype], what)[0]
            self.skip(_SCALAR_SIZE[vtype], what)
            return None
        if vtype == GGUFValueType.STRING:
            if keep:
                return self.string(what)
            self.skip(self.u64(what), what)
            return None
        # ARRAY: element type, count, elements. Fixed-size elements skip in one step.
        etype = self.value_type(what)
        count = self.u64(what)
        if etype in _SCALAR_SIZE:
            self.skip(count * _SCALAR_SIZE[etype], what)
        else:
            if count > self.size:  # each element takes at least one byte
                raise CheckpointFormatError(f"{what}: array of {count} elements cannot fit "
                                            "in the file", path=self.path)
            for _ in range(count):
                self.value(etype, what, keep=False)
        return None


def read_gguf(path: Path, *, model: str = "", rel_path: str | None = None) -> SourceFile:
    """Index a GGUF file: every tensor's ggml type, logical shape and absolute byte range.

    Quantized tensors are located as their raw blocks; ``dtype`` is the ggml type name.
    Raises :class:`CheckpointFormatError` on a bad magic, unsupported version, truncated
    header, unknown ggml type or tensor data past the end of the file.
    """
    path = Path(path)
    rel = rel_path if rel_path is not None else path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return _parse(_Cursor(f, path, size), model, rel)
    except OSError as e:
        raise CheckpointFormatError(f"cannot read: {e.strerror or e}", path=path) from e


def _parse(cur: _Cursor, model: str, rel: str) -> SourceFile:
    path, size = cur.path, cur.size
    magic = bytes(cur._need(4, "magic"))
    if magic != GGUF_MAGIC:
        raise CheckpointFormatError(f"not a GGUF file (magic {magic!r})", path=path)
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version.to_bytes(4, "little") in {v.to_bytes(4, "big") for v in SUPPORTED_VERSIONS}:
            raise CheckpointFormatError("big-endian GGUF files are not supported", path=path)
        raise CheckpointFormatError(f"unsupported GGUF version {version}", path=path)
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("key/value count")
    # Every tensor info and key/value takes well over 8 bytes: bound the counts by the size.
    if n_tensors > size // 8 or n_kv > size // 8:
        raise CheckpointFormatError(f"implausible counts ({n_tensors} tensors, {n_kv} "
                                    "key/values) for the file size: corrupted header", path=path)
    info: dict = {"version": version, "kv_count": n_kv}
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        vtype = cur.value_type(f"value type of {key!r}")
        val = cur.value(vtype, f"value of {key!r}", keep=key in _KEPT_KEYS)
        if val is not None:
            info[key] = val
    alignment = info.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointFormatError(f"general.alignment {alignment!r} is not a power of two",
                                    path=path)
    raw_tensors = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"n_dims of {name!r}")
        if n_dims > 8:
            raise CheckpointFormatError(f"tensor {name!r}: {n_dims} dimensions", path=path)
        dims = cur.unpack(f"{n_dims}Q", f"dims of {name!r}")
        type_id = cur.u32(f"type of {name!r}")
        offset = cur.u64(f"offset of {name!r}")
        raw_tensors.append((name, dims, type_id, offset))
    data_start = -(-cur.pos // alignment) * alignment
    info["data_offset"] = data_start
    tensors: list[TensorRecord] = []
    names: set[str] = set()
    for name, dims, type_id, offset in raw_tensors:
        where = f"tensor {name!r}"
        if name in names:
            raise CheckpointFormatError(f"{where}: duplicate tensor name", path=path)
        names.add(name)
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointFormatError(f"{where}: unknown ggml type {type_id}",
                                        path=path) from None
        n_el = math.prod(dims)
        if dims and dims[0] % block:
            raise CheckpointFormatError(f"{where}: first dimension {dims[0]} is not a multiple "
                                        f"of the {qtype.name} block size {block}", path=path)
        length = n_el // block * type_size
        start = data_start + offset
        if start + length > size:
            raise CheckpointFormatError(
                f"{where}: data ends at byte {start + length}, past the end of the file "
                f"({size} bytes; truncated download?)", path=path)
        tensors.append(TensorRecord(model, rel, name, qtype.name, tuple(reversed(dims)),
                                    start, length))
    tensors.sort(key=lambda t: (t.offset, t.length))
    check_no_overlap(tensors, path)
    return SourceFile(rel, path, size, FileKind.GGUF, tensors, info)
