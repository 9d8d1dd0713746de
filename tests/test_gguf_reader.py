"""The GGUF reader agrees with gguf-py's own ``GGUFReader`` (names, ggml types, shapes,
absolute offsets, lengths) on files written by ``GGUFWriter`` and on the corpus, and
refuses malformed files with a one-line :class:`CheckpointFormatError`."""

from __future__ import annotations

import io
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.factory import DEFAULT_VOCAB, make_gguf, random_tensors
from tdedup.errors import CheckpointFormatError
from tdedup.format.checkpoints import gguf_file as gguf_reader
from tdedup.format.checkpoints.gguf_file import read_gguf


def reference(path: Path) -> tuple[dict, int]:
    """gguf-py's view: name -> (type, row-major shape, absolute offset, bytes); data start."""
    r = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                        int(t.data_offset), int(t.n_bytes)) for t in r.tensors}
    return tensors, int(r.data_offset)


def ours(path: Path) -> tuple[dict, int]:
    f = read_gguf(path)
    return {t.name: (t.dtype, t.shape, t.offset, t.length) for t in f.tensors}, \
        f.info["data_offset"]


def assert_agrees(path: Path) -> None:
    mine, theirs = ours(path), reference(path)
    assert mine == theirs
    assert len(mine[0]) > 0


@pytest.mark.parametrize("which", ["f32", "q8_0", "retagged", "split"])
def test_agrees_with_gguf_py_on_written_files(gguf_family, which):
    assert_agrees(gguf_family[which])


def test_every_split_part_agrees(gguf_family):
    parts = sorted(gguf_family["split"].parent.glob("tiny-*-of-*.gguf"))
    assert len(parts) == 3
    for part in parts:
        assert_agrees(part)


def test_quantized_types_and_shapes(tmp_path):
    q = gguf.GGMLQuantizationType
    tensors = random_tensors(2, {"a": (4, 64), "b": (2, 256), "c": (3, 32), "d": (32,)})
    path = make_gguf(tmp_path / "q.gguf", tensors,
                     quantize={"a": q.Q8_0, "b": q.Q4_0, "c": q.Q4_1})
    assert_agrees(path)
    got = {t.name: (t.dtype, t.shape, t.length) for t in read_gguf(path).tensors}
    assert got == {"a": ("Q8_0", (4, 64), 4 * 2 * 34), "b": ("Q4_0", (2, 256), 2 * 8 * 18),
                   "c": ("Q4_1", (3, 32), 3 * 20), "d": ("F32", (32,), 128)}


def test_custom_alignment(tmp_path):
    tensors = random_tensors(3, {"a": (5, 3), "b": (7,)})
    for alignment in (8, 64, 256):
        assert_agrees(make_gguf(tmp_path / f"a{alignment}.gguf", tensors,
                                alignment=alignment, vocab=DEFAULT_VOCAB))


# Vocabularies that stress the vectorised string skip: NUL bytes inside tokens, empty
# tokens, tokens over 255 bytes (two-byte length fields), over 64 KiB, and long runs.
_token = st.one_of(st.text(max_size=12), st.text(alphabet="\x00a", max_size=20),
                   st.text(alphabet="xyz", min_size=250, max_size=700))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vocab=st.lists(_token, min_size=0, max_size=400))
def test_vocabularies_agree_with_gguf_py(vocab):
    tensors = random_tensors(4, {"w": (2, 32)})
    with tempfile.TemporaryDirectory() as d:
        assert_agrees(make_gguf(Path(d) / "v.gguf", tensors, vocab=vocab))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vocab=st.lists(_token, min_size=32, max_size=300),
       window=st.integers(min_value=8, max_value=2048))
def test_string_skip_at_every_window_size(vocab, window):
    """Skipping a string array lands exactly after it, whatever the scan window."""
    records = b"".join(struct.pack("<Q", len(b)) + b for b in (s.encode() for s in vocab))
    data = b"HEAD" + records + struct.pack("<Q", 5) + b"after"
    original = gguf_reader._MAX_WINDOW
    gguf_reader._MAX_WINDOW = window
    try:
        cur = gguf_reader._Cursor(io.BytesIO(data), Path("mem.gguf"), len(data))
        cur.pos = 4
        cur.skip_strings(len(vocab), "vocab")
        assert cur.pos == 4 + len(records)
        assert cur.string("after") == "after"
    finally:
        gguf_reader._MAX_WINDOW = original


# -- malformed files: written by GGUFWriter, then damaged ------------------------------


@pytest.fixture()
def written(tmp_path) -> Path:
    tensors = random_tensors(5, {"zz.weight": (4, 32), "yy.bias": (32,)})
    return make_gguf(tmp_path / "w.gguf", tensors, vocab=DEFAULT_VOCAB[:50], alignment=64,
                     quantize={"zz.weight": gguf.GGMLQuantizationType.Q8_0})


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _type_field(path: Path, name: bytes) -> int:
    """Offset of the ggml type field in the tensor info of ``name``."""
    raw = path.read_bytes()
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    return at + 4 + 8 * n_dims


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:300]), "truncated GGUF file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "past the end of the file"),
    (lambda p: p.write_bytes(p.read_bytes()[:3]), "truncated GGUF file: magic"),
    (lambda p: _patch(p, 0, b"GGUX"), "not a GGUF file"),
    (lambda p: _patch(p, 4, struct.pack("<I", 1)), "unsupported GGUF version 1"),
    (lambda p: _patch(p, 8, struct.pack("<Q", 1 << 60)), "implausible counts"),
    (lambda p: _patch(p, _type_field(p, b"zz.weight"), struct.pack("<I", 250)),
     "unknown ggml type 250"),
    (lambda p: _patch(p, _type_field(p, b"zz.weight") - 16, struct.pack("<Q", 33)),
     "not a multiple of the Q8_0 block size"),
    (lambda p: _patch(p, _type_field(p, b"yy.bias") + 4, struct.pack("<Q", 0)), "overlap"),
    (lambda p: _patch(p, p.read_bytes().index(b"general.alignment") + 21,
                      struct.pack("<I", 48)), "not a power of two"),
])
def test_malformed_gguf(written, damage, message):
    damage(written)
    with pytest.raises(CheckpointFormatError, match=message) as e:
        read_gguf(written)
    assert e.value.path == str(written)


def test_big_endian_gguf_is_refused(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("x", np.arange(32, dtype=np.float32).byteswap().view(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointFormatError, match="big-endian"):
        read_gguf(tmp_path / "be.gguf")


# -- the corpus -------------------------------------------------------------------------

# gguf-py needs ~2 s per SmolLM file (it parses the vocabulary); two of them suffice to
# cover the shipped Q4_1 layout and a moved data section.
CORPUS_GGUF = ["minilm-gguf/f32.gguf", "minilm-gguf/f16.gguf", "minilm-gguf/q8_0.gguf",
               "smollm/q4_1.gguf", "smollm/q4_1-retagged.gguf"]


@pytest.mark.corpus
@pytest.mark.parametrize("entry", CORPUS_GGUF)
def test_agrees_with_gguf_py_on_the_corpus(corpus, corpus_facts, entry):
    path = corpus / entry
    assert_agrees(path)
    facts = corpus_facts["models"][entry]
    f = read_gguf(path)
    assert len(f.tensors) == facts["tensors"]
    assert f.tensor_bytes == facts["tensor_bytes"]
    assert f.info["data_offset"] == facts["data_offset"]
    assert f.info["kv_count"] == facts["kv_count"]


@pytest.mark.corpus
def test_head_counts_agree_with_gguf_py(corpus):
    """The derivation analyzer undoes llama's Q/K row permutation with these two values."""
    path = corpus / "smollm/q4_1.gguf"
    fields = gguf.GGUFReader(path).fields
    info = read_gguf(path).info
    arch = info["general.architecture"]
    for key in (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
        fld = fields[key]
        assert info[key] == int(fld.parts[fld.data[0]][0]) > 0
