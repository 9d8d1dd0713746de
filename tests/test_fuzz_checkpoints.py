"""Fuzz the checkpoint readers with mutated *real* safetensors and GGUF files.

Every mutation must end in a :class:`TdedupError` (``CheckpointFormatError``) or read as
a valid file; never an IndexError, MemoryError, OverflowError, struct.error,
UnicodeDecodeError, a crash or a hang. Files that still read must pack and unpack byte
for byte, and the CLI must answer a damaged file with one ``error:`` line and exit 2.

Cases per run (CI, ~10 s on 2 cores): 4,669 enumerated mutations of the tiny family's
files (every truncation, every flipped header byte, every header field set to hostile
values, wrong-typed JSON, overlapping offsets, duplicate names, unknown dtypes and ggml
types), 1,500 hypothesis examples, and 1,569 header mutations of corpus checkpoints when
the corpus is built. ``bench/fuzz.py`` runs the same generators longer (bench/RESULTS.md).
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers import hostile_helpers as hh
import tdedup
from tdedup.cli.app import app
from tdedup.format.checkpoints.sources import read_weight_file
from tdedup.format.checkpoints.records import FileKind

runner = CliRunner()
MIN_ENUMERATED = 4000  # cases the enumerated generators must yield for the tiny family


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, tuple[FileKind, Path]]:
    fam = hh.make_tiny_family(tmp_path_factory.mktemp("fam"), empty=True)
    return {"safetensors": (FileKind.SAFETENSORS, fam["base"] / "model.safetensors"),
            "gguf": (FileKind.GGUF, fam["gguf"])}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = hh.scratch_dir(tmp_path_factory.mktemp("scratch"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def cases_of(kind: FileKind, path: Path, *, size: int | None = None, every_byte: bool = True,
             data: bytes | None = None, max_tensors: int | None = None):
    data = path.read_bytes() if data is None else data
    if kind is FileKind.GGUF:
        fields, data_offset = hh.gguf_fields(path)
        return hh.gguf_cases(data, fields, data_offset, size=size, every_byte=every_byte,
                             max_fields=max_tensors and 5 * max_tensors)
    return hh.safetensors_cases(data, size=size, every_byte=every_byte,
                                max_tensors=max_tensors)


def read(kind: FileKind, path: Path):
    return read_weight_file(path, kind, "m", path.name)


def run_cases(kind: FileKind, cases, scratch: Path, tally: hh.Tally, *, cli_every: int = 0,
              accepted_out: list | None = None) -> None:
    target = scratch / f"case.{kind.value}"
    for i, (label, data, size) in enumerate(cases):
        tally.cases += 1
        hh.write_case(target, data, size)
        err = hh.expect_refusal_or_success(lambda: read(kind, target), label, tally)
        if err is not None and cli_every and i % cli_every == 0:
            result = runner.invoke(app, ["analyze", str(target)])
            assert result.exit_code == 2, (label, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (label, result.stderr)
        if err is None and accepted_out is not None:
            accepted_out.append((label, data, size))


@pytest.mark.parametrize("name", ["safetensors", "gguf"])
def test_enumerated_mutations(seeds, scratch, name):
    kind, path = seeds[name]
    tally = hh.Tally()
    accepted: list = []
    run_cases(kind, cases_of(kind, path), scratch, tally, cli_every=10, accepted_out=accepted)
    print(f"\nfuzz {name}: {tally.cases} cases, {tally.refused} refused, "
          f"{tally.accepted} read as valid")
    assert tally.cases >= MIN_ENUMERATED // 2
    assert tally.refused > tally.cases * 0.8
    # What still reads is a real file: pack and unpack restore it byte for byte.
    for label, data, size in accepted[:: max(1, len(accepted) // 40)]:
        src = scratch / f"ok.{kind.value}"
        hh.write_case(src, data, size)
        bundle = scratch / "ok.tdd"
        out = scratch / "out"
        shutil.rmtree(out, ignore_errors=True)
        tdedup.pack([f"m={src}"], bundle)
        tdedup.unpack(bundle, out)
        assert (out / "m" / src.name).read_bytes() == src.read_bytes(), label


# -- hypothesis: random edits of the same seeds -------------------------------------------

FUZZ = settings(max_examples=500, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.data())
def test_random_byte_edits(seeds, scratch, data):
    """A few bytes overwritten anywhere and maybe a truncation, in either format."""
    name = data.draw(st.sampled_from(sorted(seeds)))
    kind, path = seeds[name]
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        off = data.draw(st.integers(0, len(raw) - 1))
        raw[off] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    target = hh.write_case(scratch / f"h.{kind.value}", bytes(raw))
    hh.expect_refusal_or_success(lambda: read(kind, target), f"{name}: random edits")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                        max_size=4),
                    max_leaves=12)


@FUZZ
@given(st.data())
def test_safetensors_header_values(seeds, scratch, data):
    """Any JSON value at any place of a real safetensors header."""
    kind, path = seeds["safetensors"]
    raw = path.read_bytes()
    _, header = hh.safetensors_parts(raw)
    name = data.draw(st.sampled_from(sorted(header)))
    value = data.draw(JSON)
    if data.draw(st.booleans()) and isinstance(header[name], dict):
        key = data.draw(st.sampled_from(sorted(header[name]) + ["extra"]))
        header[name][key] = value
    else:
        header[name] = value
    target = hh.write_case(scratch / "j.safetensors", hh.safetensors_with_header(raw, header))
    hh.expect_refusal_or_success(lambda: read(kind, target), f"{name}: {value!r}")


@FUZZ
@given(st.data())
def test_gguf_header_fields(seeds, scratch, data):
    """Any value in any count, length, type or offset field of a real GGUF header."""
    kind, path = seeds["gguf"]
    fields, _ = hh.gguf_fields(path)
    raw = path.read_bytes()
    for _ in range(data.draw(st.integers(1, 3))):
        f = data.draw(st.sampled_from(fields))
        raw = hh.set_field(raw, f, data.draw(st.integers(-(2**64), 2**64)))
    target = hh.write_case(scratch / "g.gguf", raw)
    hh.expect_refusal_or_success(lambda: read(kind, target), "gguf fields")


# -- the corpus: real headers of real checkpoints -----------------------------------------

# (bench/fuzz.py adds SmolLM: its 49k-token header takes seconds to map out.)
CORPUS_FILES = [("minilm/lora-adapter/adapter_model.safetensors", FileKind.SAFETENSORS),
                ("minilm/base/model.safetensors", FileKind.SAFETENSORS),
                ("minilm-gguf/q8_0.gguf", FileKind.GGUF)]


def header_end(kind: FileKind, path: Path) -> int:
    with open(path, "rb") as f:
        if kind is FileKind.SAFETENSORS:
            return 8 + struct.unpack("<Q", f.read(8))[0]
    return hh.gguf_fields(path)[1]


@pytest.mark.corpus
@pytest.mark.parametrize("rel,kind", CORPUS_FILES, ids=[c[0] for c in CORPUS_FILES])
def test_corpus_headers(corpus, scratch, rel, kind):
    """Hostile headers of real checkpoints: the header region is mutated and the rest of
    the file kept as a sparse run of zeros of the original length."""
    path = corpus / rel
    if not path.is_file():
        pytest.skip(f"{rel} not in the corpus")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(header_end(kind, path) + 64)
    tally = hh.Tally()
    cases = itertools.islice(
        cases_of(kind, path, size=size, every_byte=False, data=head, max_tensors=4),
        0, None, 2)
    run_cases(kind, cases, scratch, tally, cli_every=50)
    print(f"\nfuzz corpus {rel}: {tally.cases} cases, {tally.refused} refused")
    assert tally.refused > 0


def test_json_metadata_dump_does_not_crash(seeds, scratch):
    """A header that is valid JSON but not what safetensors writes, end to end in the CLI:
    analyze answers with one line, pack writes nothing."""
    kind, path = seeds["safetensors"]
    raw = path.read_bytes()
    _, header = hh.safetensors_parts(raw)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 2**64]
    target = hh.write_case(scratch / "bad.safetensors", hh.safetensors_with_header(raw, header))
    for args in (["analyze", str(target)], ["pack", str(target), "-o", str(scratch / "x.tdd")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and "bad.safetensors" in result.stderr
    assert not (scratch / "x.tdd").exists()
    assert not list(scratch.glob(".x.tdd.*"))
    json.dumps(header)  # the case itself is plain JSON
