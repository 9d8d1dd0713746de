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

import numpy as np
from gguf import GGUFValueType

from ...errors import CheckpointFormatError
from .dtypes import ggml_blocks
from .records import FileKind, SourceFile, TensorRecord, shape_overflows
from .safetensors import check_no_overlap

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# A GGUF split part: name-00001-of-00003.gguf (llama.cpp's gguf-split convention).
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<n>\d{5})\.gguf$")

# Fixed-size value types, keyed by gguf-py's enum, as precompiled little-endian structs.
_SCALAR: dict[GGUFValueType, struct.Struct] = {
    vtype: struct.Struct("<" + fmt) for vtype, fmt in {
        GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b",
        GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
        GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
        GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
        GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
        GGUFValueType.FLOAT64: "d",
    }.items()}
_U32, _U64 = _SCALAR[GGUFValueType.UINT32], _SCALAR[GGUFValueType.UINT64]
# Metadata we keep (cheap, small) for reports; everything else is skipped.
_KEPT_KEYS = {"general.architecture", "general.name", "general.alignment",
              "general.file_type", "split.count", "split.no", "split.tensors.count"}
# Per-architecture keys kept too ("<arch>.attention.head_count[_kv]"): the converter permutes
# attn_q/attn_k rows by these, and the derivation analyzer needs them to undo it.
_KEPT_SUFFIXES = (".attention.head_count", ".attention.head_count_kv")
# Refuse absurd strings long before memory is at risk.
_MAX_STRING = 1 << 30
_MAX_NESTING = 8
# Header bytes read at once. Vocabulary arrays are scanned a window at a time; a window is
# never more than _MAX_WINDOW bytes so a corrupted count cannot make us read the whole file.
_CHUNK = 1 << 20
_MAX_WINDOW = 1 << 23


def _string_run(buf: bytes, start: int, stop: int, count: int) -> tuple[int, int]:
    """Skip up to ``count`` GGUF strings lying wholly in ``buf[start:stop]``.

    A vocabulary is tens of thousands of ``(u64 length, bytes)`` records, and walking them
    one by one in Python costs ~25 ms a file, as much as hashing 100 MB. Tokens are short,
    so almost every length field is one nonzero byte and seven zero bytes. We find every
    position that looks like that, compute where such a record would end, and jump over
    whole runs where "record i ends where candidate i+1 starts". Every step is thus checked
    against the real length field, so a false candidate (zero bytes inside a token) is
    never taken for a record; where the chain leaves the candidates (a string of 256 bytes
    or more) we step once exactly and pick the chain up again. Returns ``(strings skipped,
    new offset in buf)``; it stops at the first record that crosses ``stop``.
    """
    width = stop - start
    if width < 8:
        return 0, start
    a = np.frombuffer(buf, np.uint8, count=width, offset=start)
    # short[p]: the u64 at p is below 256. Eight strided u64 views, one per residue mod 8,
    # test every position at ~1.2 ms per MB (seven shifted byte masks took ~1.8).
    short = np.empty(width - 7, bool)
    for r in range(8):
        np.less(np.frombuffer(buf, "<u8", count=(width - r) // 8, offset=start + r), 256,
                out=short[r::8])
    starts = np.flatnonzero(short)
    ends = starts + 8 + a[starts]
    breaks = np.flatnonzero(ends[:-1] != starts[1:])
    pos = done = 0
    while done < count:
        i = int(np.searchsorted(starts, pos))
        if i == len(starts) or starts[i] != pos:  # not a short string: one exact step
            if pos + 8 > width:
                break
            end = pos + 8 + _U64.unpack_from(buf, start + pos)[0]
            if end > width:
                break
            pos, done = end, done + 1
            continue
        j = int(np.searchsorted(breaks, i))
        last = int(breaks[j]) if j < len(breaks) else len(starts) - 1
        steps = min(last - i + 1, count - done)
        if ends[i + steps - 1] > width:  # only a run's final record can cross the window
            steps -= 1
            if not steps:
                break
        pos = int(ends[i + steps - 1])
        done += steps
    return done, start + pos


class _Cursor:
    """Bounds-checked little-endian reads over the file, buffered in large chunks."""

    def __init__(self, f, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next read

    def _truncated(self, n: int, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(
            f"truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, file has "
            f"{self.size}", path=self.path)

    def _fill(self, n: int, what: str) -> int:
        """Make ``[pos, pos + n)`` available in ``buf``; return where it starts there."""
        if n < 0 or self.pos + n > self.size:
            raise self._truncated(n, what)
        start = self.pos - self.base
        if start + n > len(self.buf):
            self.f.seek(self.pos)
            self.buf = self.f.read(max(n, _CHUNK))
            self.base, start = self.pos, 0
            if len(self.buf) < n:  # the file shrank under us
                raise self._truncated(n, what)
        return start

    def _need(self, n: int, what: str) -> memoryview:
        start = self._fill(n, what)
        self.pos += n
        return memoryview(self.buf)[start:start + n]

    def scalar(self, st: struct.Struct, what: str):
        start = self._fill(st.size, what)
        self.pos += st.size
        return st.unpack_from(self.buf, start)[0]

    def unpack(self, fmt: str, what: str):
        st = struct.Struct("<" + fmt)
        start = self._fill(st.size, what)
        self.pos += st.size
        return st.unpack_from(self.buf, start)

    def u32(self, what: str) -> int:
        return self.scalar(_U32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_U64, what)

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
            raise self._truncated(n, what)
        self.pos += n

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` strings, a window of the file at a time."""
        while count >= 32:  # a scan costs ~50 µs before it pays off
            # Tokens average ~8-20 bytes with their length field: a window this size
            # usually holds the whole array without scanning far past it.
            window = min(self.size - self.pos, _MAX_WINDOW, 20 * count + 4096)
            start = self._fill(window, what)
            done, end = _string_run(self.buf, start, start + window, count)
            self.pos += end - start
            count -= done
            if count and not done:  # one string larger than the window, or a truncation
                self.skip(self.u64(what), what)
                count -= 1
        for _ in range(count):
            self.skip(self.u64(what), what)

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise CheckpointFormatError(f"{what}: unknown GGUF value type {raw}",
                                        path=self.path) from None

    def value(self, vtype: GGUFValueType, what: str, keep: bool, depth: int = 0):
        """Read (keep=True) or skip one value; returns the value or None."""
        st = _SCALAR.get(vtype)
        if st is not None:
            if keep:
                return self.scalar(st, what)
            self.skip(st.size, what)
            return None
        if vtype == GGUFValueType.STRING:
            if keep:
                return self.string(what)
            self.skip(self.u64(what), what)
            return None
        # ARRAY: element type, count, elements. Fixed-size elements skip in one step.
        etype = self.value_type(what)
        count = self.u64(what)
        st = _SCALAR.get(etype)
        if st is not None:
            self.skip(count * st.size, what)
            return None
        if count > self.size - self.pos:  # each element takes at least one byte
            raise CheckpointFormatError(f"{what}: array of {count} elements cannot fit "
                                        "in the file", path=self.path)
        if etype == GGUFValueType.STRING:
            self.skip_strings(count, what)
        else:  # arrays of arrays: rare, small; bounded so a crafted file cannot recurse
            if depth >= _MAX_NESTING:
                raise CheckpointFormatError(f"{what}: arrays nested over {_MAX_NESTING} deep",
                                            path=self.path)
            for _ in range(count):
                self.value(etype, what, keep=False, depth=depth + 1)
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
        val = cur.value(vtype, f"value of {key!r}", keep=key in _KEPT_KEYS or key.endswith(_KEPT_SUFFIXES))
        if val is not None:
            info[key] = val
    alignment = info.get("general.alignment", DEFAULT_ALIGNMENT)
    # llama.cpp and gguf-py's writer accept only powers of two; so do we.
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
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
        qtype = ggml_blocks(type_id)
        if qtype is None:
            raise CheckpointFormatError(f"{where}: unknown ggml type {type_id}", path=path)
        if shape_overflows(dims):
            raise CheckpointFormatError(f"{where}: shape {list(reversed(dims))} is too large to "
                                        "load (over 2^59 elements, zeros counted as 1)", path=path)
        n_el = math.prod(dims)
        if dims and dims[0] % qtype.block:
            raise CheckpointFormatError(f"{where}: first dimension {dims[0]} is not a multiple "
                                        f"of the {qtype.name} block size {qtype.block}",
                                        path=path)
        length = qtype.nbytes(n_el)
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


def check_split(parts: list[SourceFile]) -> None:
    """Refuse a split GGUF whose parts are not one model's: every part of an N-part split
    (N > 1) must say ``split.count`` N and its own ``split.no`` (0-based, llama.cpp's
    gguf-split and gguf-py's writer), the tensor total must be ``split.tensors.count``
    where given, and no tensor name may occur in two parts. A one-part "split" may omit
    the keys. One line naming the part at fault."""
    n = len(parts)
    seen: dict[str, str] = {}
    for i, part in enumerate(parts):
        count, no = part.info.get("split.count"), part.info.get("split.no")
        if n > 1 or count is not None or no is not None:
            if count is None or no is None:
                raise CheckpointFormatError(
                    f"part {i + 1} of a {n}-part split GGUF has no split.count/split.no "
                    "keys: not a part of this split (replaced by another file?)",
                    path=part.abs_path)
            if count != n or no != i:
                raise CheckpointFormatError(
                    f"says it is part {no + 1 if isinstance(no, int) else no!r} of {count!r} "
                    f"(split.no {no!r}, split.count {count!r}); its name makes it part "
                    f"{i + 1} of {n}", path=part.abs_path)
        for t in part.tensors:
            if t.name in seen:
                raise CheckpointFormatError(
                    f"tensor {t.name!r} is also in {seen[t.name]}: the parts of a split "
                    "GGUF hold each tensor once", path=part.abs_path)
            seen[t.name] = part.rel_path
    total = parts[0].info.get("split.tensors.count")
    if isinstance(total, int) and n > 1 and total != len(seen):
        raise CheckpointFormatError(
            f"split.tensors.count says {total} tensors; its {n} parts hold {len(seen)}",
            path=parts[0].abs_path)
