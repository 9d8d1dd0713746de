"""Helpers of the bundle tests (pack / unpack / verify / inspect) beyond tests/factory.py.

:func:`write_safetensors` writes the safetensors byte layout by hand, for the edge cases
the library never writes (gaps between tensors, a zero-length tensor inside another's
range); everything else comes from the real writers in ``factory``.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

MINILM_FAMILY = ("base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged")

# numpy dtype of each safetensors dtype the tests generate (BF16 is stored as raw u16).
ST_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
            "U8": np.uint8}


def minilm_family(corpus: Path) -> list[Path]:
    paths = [corpus / "minilm" / name for name in MINILM_FAMILY]
    missing = [p.name for p in paths if not p.is_dir()]
    if missing:
        pytest.skip(f"corpus at {corpus} lacks minilm/{', minilm/'.join(missing)}")
    return paths


# -- tensors --------------------------------------------------------------------------

def tensor_bytes(dtype: str, shape: tuple[int, ...], seed: int) -> bytes:
    """Deterministic bytes of a tensor (random normal floats, random integers)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype in ("F32", "F16"):
        a = rng.standard_normal(n).astype(ST_NUMPY[dtype])
    elif dtype == "BF16":
        a = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    elif dtype == "I64":
        a = rng.integers(-(1 << 40), 1 << 40, n, dtype=np.int64)
    else:
        a = rng.integers(0, 256, n, dtype=np.uint8)
    return a.tobytes()


def write_safetensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...], bytes]], *,
                      gap: int = 0, extra: dict | None = None) -> None:
    """Write a safetensors file with the data in list order and ``gap`` bytes after each
    tensor; ``extra`` header entries are added as given (e.g. empty tensors anywhere)."""
    header: dict = {}
    pos = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [pos, pos + len(data)]}
        pos += len(data) + gap
    header.update(extra or {})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, _, data in tensors:
            f.write(data + b"\0" * gap)


def safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute (offset, length) of each tensor, from the file's own header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items()}


# -- checks ---------------------------------------------------------------------------

def tree(folder: Path) -> dict[str, bytes]:
    """Every regular file below ``folder`` (hidden ones included), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def model_tree(path: Path) -> dict[str, bytes]:
    """What a model argument restores to: a file (every part of a split GGUF), or a
    folder's files outside hidden folders (hidden files such as .gitattributes count)."""
    m = re.match(r"^(.+)-\d{5}-of-(\d{5})\.gguf$", path.name)
    if path.is_file() and m:  # a split GGUF: every part
        parts = [path.with_name(f"{m[1]}-{i:05d}-of-{m[2]}.gguf")
                 for i in range(1, int(m[2]) + 1)]
        return {p.name: p.read_bytes() for p in parts}
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {k: v for k, v in tree(path).items()
            if not any(part.startswith(".") for part in k.split("/")[:-1])}


def assert_restored(sources: dict[str, Path], dest: Path) -> None:
    """Each model NAME restored under dest/NAME byte for byte, and nothing else."""
    assert sorted(p.name for p in dest.iterdir()) == sorted(sources)
    for name, src in sources.items():
        want, got = model_tree(src), tree(dest / name)
        assert sorted(got) == sorted(want), name
        for rel in want:
            assert got[rel] == want[rel], f"{name}/{rel} differs"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))
