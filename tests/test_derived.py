"""Derived tensors end to end: codec, planner across formats, pack/unpack/load bit-exact.

Ladders are built with the real libraries: gguf-py writes GGUF files (its quantizers and
TensorNameMap names), safetensors writes the F32/F16/BF16 files; where llama.cpp is built,
its converter and llama-quantize make the corpus MiniLM ladder (``llamacpp``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import tdedup
from helpers.hostile_helpers import slow
from tdedup.analyzers.derivation import canonical_names, plan_derived
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.errors import BundleFormatError, TdedupError, UsageError
from tdedup.format.bundle.constants import BlobEncoding
from tdedup.format.codecs import decode, encode
from tdedup.format.codecs.derived import (
    decode_ref,
    encode_derived,
    encode_ref,
    parse_derived,
)
from tdedup.format.codecs.transforms import Transform, TransformKind, type_number

HF = {  # HF BERT names -> shapes (rows multiple of 256 so K-quants apply)
    "embeddings.word_embeddings.weight": (64, 256),
    "encoder.layer.0.attention.self.query.weight": (256, 256),
    "encoder.layer.0.attention.self.query.bias": (256,),
    "encoder.layer.0.output.dense.weight": (256, 512),
    "encoder.layer.1.attention.self.key.weight": (256, 256),
}


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in HF.items()}


def _gguf_name(hf: str) -> str:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, 2)
    return tmap.get_name(hf, try_suffixes=(".weight", ".bias"))


def _write_gguf(path: Path, tensors: dict[str, np.ndarray], qtype: str) -> None:
    w = gguf.GGUFWriter(path, "bert")
    w.add_block_count(2)
    w.add_token_list([f"tok{i}" for i in range(3000)])  # metadata repeated across the ladder
    q = gguf.GGMLQuantizationType[qtype]
    for name, x in tensors.items():
        if x.ndim == 1 or q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name), x)
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(_gguf_name(name), x.astype(np.float16))
        else:
            data = gguf.quants.quantize(x, q)
            w.add_tensor(_gguf_name(name), data, raw_shape=data.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("ladder")
    x = _tensors()
    save_file(x, d / "f32.safetensors")
    save_file({k: v.astype(np.float16) for k, v in x.items()}, d / "f16.safetensors")
    for q in ("F16", "Q8_0", "Q4_0", "Q5_1"):
        _write_gguf(d / f"{q.lower()}.gguf", x, q)
    names = ["f32.safetensors", "f16.safetensors", "f16.gguf", "q8_0.gguf", "q4_0.gguf",
             "q5_1.gguf"]
    return [f"{n.replace('.', '-')}={d / n}" for n in names]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_derived_codec_round_trips_exact_and_inexact():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    chain = (Transform(TransformKind.QUANTIZE, type_number("Q4_K")),)
    from tdedup.format.codecs.transforms import TypedTensor, apply_chain
    target = apply_chain(chain, TypedTensor.of(x.tobytes(), "F32", x.shape)).tobytes()
    for actual in (target, bytes([target[0] ^ 1]) + target[1:]):
        stored = encode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, actual, base=x.tobytes(),
                        derive=(chain, "F32", x.shape))
        assert bytes(decode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, stored, len(actual),
                            base=x.tobytes())) == actual
    assert len(encode_derived(target, x.tobytes(), chain, "F32", x.shape)) < 300
    assert parse_derived(stored)[:3] == (chain, "F32", (4, 256))


def test_derived_decode_refuses_bad_headers():
    x = np.zeros((1, 32), np.float32).tobytes()
    stored = encode_derived(bytes(34), x, (Transform(TransformKind.QUANTIZE, 8),), "F32", (1, 32))
    for bad in (stored[:3], b"\x03" + stored[1:], stored[:8] + b"\x63" + stored[9:],
                stored[:4] + b"\xff\xff\x00\x00" + stored[8:]):
        with pytest.raises(TdedupError):
            decode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, bad, 34, base=x)
    with pytest.raises(TdedupError):  # base of the wrong size for the declared shape
        decode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, stored, 34, base=x[:64])


def test_zstd_ref_makes_a_repeated_layout_nearly_free():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    data = base[:500_000] + b"changed" + base[500_007:]
    stored = encode_ref(data, base)
    assert len(stored) < 2000
    assert decode_ref(stored, len(data), base) == data
    with pytest.raises(TdedupError):
        decode_ref(stored, len(data) - 1, base)


def test_canonical_names_map_safetensors_to_gguf(ladder):
    scanned = hash_models(index_models(ladder[:3]))
    canon = canonical_names(scanned)
    hf = "encoder.layer.0.attention.self.query.weight"
    assert canon[("f32-safetensors", "f32.safetensors", hf)] == "blk.0.attn_q.weight"


def test_planner_finds_every_derivable_tensor(ladder):
    scanned = hash_models(index_models(ladder))
    plan = plan_derived(scanned)
    by_model: dict[str, list] = {}
    firsts = scanned.first_occurrences()
    for key, choice in plan.items():
        by_model.setdefault(firsts[key].record.model, []).append(choice)
    # every cast or quantized tensor of a later model derives exactly from another model
    # (the F16 safetensors casts the bias too; GGUF files keep 1-D tensors F32: duplicates)
    # (f16.gguf holds the F16 safetensors' very bytes: exact duplicates, nothing derived)
    want = {"f16-safetensors": 5, "q8_0-gguf": 4, "q4_0-gguf": 4, "q5_1-gguf": 4}
    for model, n in want.items():
        assert len(by_model[model]) == n, model
        assert all(c.agreement == 1.0 for c in by_model[model])


def test_transposes_and_their_casts_are_found_on_corner_samples(tmp_path):
    """A transposed copy and a transposed F16 cast derive from the base; the planner
    samples a corner block of each (not every column: that read the whole base)."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 96)) * 0.05).astype(np.float32)
    save_file({"w": w}, str(tmp_path / "base.safetensors"))
    save_file({"w": np.ascontiguousarray(w.T)}, str(tmp_path / "t.safetensors"))
    save_file({"w": np.ascontiguousarray(w.T).astype(np.float16)}, str(tmp_path / "h.safetensors"))
    scanned = hash_models(index_models([f"{m}={tmp_path / m}.safetensors"
                                        for m in ("base", "t", "h")]))
    plan = plan_derived(scanned)
    firsts = scanned.first_occurrences()
    chains = {firsts[k].record.model: [t.kind for t in c.chain] for k, c in plan.items()
              if c.agreement == 1.0}
    assert chains["t"] == [TransformKind.TRANSPOSE]
    assert chains["h"] in ([TransformKind.TRANSPOSE, TransformKind.CAST], [TransformKind.CAST])
    tdedup.pack([f"{m}={tmp_path / m}.safetensors" for m in ("base", "t", "h")],
                tmp_path / "b.tdd")
    tdedup.unpack(tmp_path / "b.tdd", tmp_path / "out")
    for m in ("base", "t", "h"):
        assert _sha(tmp_path / "out" / m / f"{m}.safetensors") == \
            _sha(tmp_path / f"{m}.safetensors")


def test_pack_derives_by_default_and_round_trips(ladder, tmp_path):
    plain = tdedup.pack(ladder, tmp_path / "off.tdd", derive="off")
    res = tdedup.pack(ladder, tmp_path / "on.tdd")
    assert res.encodings.get("derived_xor_byteplane_zstd", 0) == 17  # 5 + 3 x 4
    assert res.bundle_bytes < 0.6 * plain.bundle_bytes
    out = tdedup.unpack(tmp_path / "on.tdd", tmp_path / "out")
    for arg in ladder:
        name, path = arg.split("=", 1)
        restored = next((tmp_path / "out" / name).rglob(Path(path).name))
        assert _sha(restored) == _sha(Path(path))
    del out


def test_add_and_merge_derive_against_the_bundle(ladder, tmp_path):
    """A precision added to a bundle is stored as a transform of the bundle's tensors, as a
    fresh pack of all of them stores it (add used to plan deltas only: each addition was
    stored whole), and a merge of bundles (add under the hood) likewise."""
    fresh = tdedup.pack(ladder, tmp_path / "fresh.tdd")
    tdedup.pack(ladder[:1], tmp_path / "base.tdd")
    added = tdedup.add(tmp_path / "base.tdd", ladder[1:], output=tmp_path / "added.tdd")
    assert added.bundle_bytes <= 1.02 * fresh.bundle_bytes
    assert _stored_tensor_bytes(tmp_path / "added.tdd")[1] == 17  # as test above
    tdedup.pack(ladder[1:], tmp_path / "rest.tdd", derive="off")
    from typer.testing import CliRunner

    from tdedup.cli.app import app

    merged = tmp_path / "merged.tdd"
    res = CliRunner().invoke(app, ["pack", str(tmp_path / "base.tdd"), str(tmp_path / "rest.tdd"),
                                   "-o", str(merged), "-q"])
    assert res.exit_code == 0, res.output
    assert merged.stat().st_size <= 1.02 * fresh.bundle_bytes
    off = tdedup.add(tmp_path / "base.tdd", ladder[1:], output=tmp_path / "off.tdd",
                     derive="off")
    assert _stored_tensor_bytes(tmp_path / "off.tdd")[1] == 0
    assert off.bundle_bytes > 1.5 * fresh.bundle_bytes
    for bundle in ("added", "merged"):
        tdedup.unpack(tmp_path / f"{bundle}.tdd", tmp_path / f"out-{bundle}")
        for arg in ladder:
            name, path = arg.split("=", 1)
            restored = next((tmp_path / f"out-{bundle}" / name).rglob(Path(path).name))
            assert _sha(restored) == _sha(Path(path)), (bundle, name)
    with pytest.raises(UsageError, match="derive"):
        tdedup.add(tmp_path / "base.tdd", ladder[1:], output=tmp_path / "x.tdd", derive="on")


def test_load_rebuilds_derived_tensors_bit_exact(ladder, tmp_path):
    torch = pytest.importorskip("torch")
    tdedup.pack(ladder, tmp_path / "b.tdd")
    loaded = tdedup.load(tmp_path / "b.tdd", device="cpu")
    x = _tensors()
    for name, arr in x.items():
        want = torch.from_numpy(arr.astype(np.float16))
        got = loaded["f16-safetensors"][name]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_0) if arr.ndim == 2 else arr
        got = loaded["q4_0-gguf"][_gguf_name(name)]
        assert got.cpu().numpy().tobytes() == q.tobytes()


def test_derive_option_is_validated(ladder, tmp_path):
    with pytest.raises(TdedupError):
        tdedup.pack(ladder[:2], tmp_path / "x.tdd", derive="maybe")


def test_a_reader_of_1_0_refuses_derived_blobs(ladder, tmp_path, monkeypatch):
    """§11: a reader that knows only 1.0's encodings refuses 24 and 25 by name, cleanly."""
    from enum import IntEnum

    from tdedup.format.bundle import manifest as manifest_mod

    tdedup.pack(ladder[:2], tmp_path / "b.tdd")
    v1_0 = IntEnum("BlobEncoding", {e.name: e.value for e in BlobEncoding
                                    if not e.any_length_base})
    v1_0.is_delta = property(lambda self: 16 <= self < 32)
    v1_0.any_length_base = property(lambda self: False)
    monkeypatch.setattr(manifest_mod, "BlobEncoding", v1_0)
    with pytest.raises(BundleFormatError, match="unknown blob encoding 2[45]"):
        tdedup.open_bundle(tmp_path / "b.tdd").close()


def test_cli_pack_derive_option(ladder, tmp_path):
    from typer.testing import CliRunner

    from tdedup.cli.app import app

    runner = CliRunner()
    for derive, want in (("off", 0), ("auto", 17)):
        out = tmp_path / f"{derive}.tdd"
        res = runner.invoke(app, ["pack", *ladder, "-o", str(out), "--derive", derive, "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["encodings"].get("derived_xor_byteplane_zstd", 0) == want
    res = runner.invoke(app, ["pack", *ladder, "-o", str(tmp_path / "x.tdd"), "--derive", "no"])
    assert res.exit_code == 2 and "--derive" in res.output


def _stored_tensor_bytes(bundle: Path) -> tuple[int, int]:
    """(stored bytes of the tensor blobs, how many of them are derived)."""
    with tdedup.open_bundle(bundle, mapped=False) as b:
        recs = {t.hash: b.blob(t.hash) for m in b.manifest.models for f in m.files
                for t in f.tensors}
    return (sum(r.stored_length for r in recs.values()),
            sum(r.encoding is BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD for r in recs.values()))


def _dry_run(args: list[str]) -> dict:
    from typer.testing import CliRunner

    from tdedup.cli.app import app

    res = CliRunner().invoke(app, ["pack", *args, "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_dry_run_plans_the_derived_blobs_pack_stores(ladder, tmp_path):
    """``pack --dry-run`` used to ignore derivation (the default): it estimated a ladder as
    if every blob were self-contained. It now makes pack's choices, for either --derive
    and either layout, and writes nothing."""
    from typer.testing import CliRunner

    from tdedup.cli.app import app

    out = tmp_path / "x.tdd"
    for derive in ("auto", "off"):
        for layout in ("compact", "serving"):
            e = _dry_run([*ladder, "-o", str(out), "--derive", derive, "--layout", layout])
            assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
            assert (e["derive"], e["layout"]) == (derive, layout)
            tdedup.pack(ladder, out, derive=derive, layout=layout)
            stored, derived = _stored_tensor_bytes(out)
            out.unlink()
            assert e["derived_blobs"] == derived == (17 if derive == "auto" else 0)
            assert e["self_blobs"] + e["delta_blobs"] + e["derived_blobs"] == \
                e["distinct_tensors"]
            assert abs(e["estimated_bytes"] - stored) <= 0.05 * stored, (derive, layout, e)
            if derive == "auto":
                assert sum(e["derived_transforms"].values()) == 17
                assert e["estimated_bytes"] < 0.6 * e["estimated_without_deltas_bytes"]
    text = CliRunner().invoke(app, ["pack", *ladder, "-o", str(out), "--dry-run"]).stdout
    assert "17 derived" in text and "Q8_0 quantization (derived)" in " ".join(text.split())
    assert not out.exists()


@pytest.mark.corpus
def test_corpus_minilm_ladder_dry_run_matches_the_pack(corpus, tmp_path):
    """The QA case: base + F16/BF16 safetensors + F32/F16/Q8_0 GGUF estimated at ~168.7 MB
    (as with --derive off) while the pack is ~74.6 MB."""
    args = [str(corpus / "minilm/base"), str(corpus / "minilm/f16.safetensors"),
            str(corpus / "minilm/bf16.safetensors"),
            *[str(corpus / "minilm-gguf" / f"{t}.gguf") for t in ("f32", "f16", "q8_0")]]
    out = tmp_path / "l.tdd"
    e = _dry_run([*args, "-o", str(out)])
    off = _dry_run([*args, "-o", str(out), "--derive", "off"])
    assert not out.exists()
    tdedup.pack(args, out)
    stored, derived = _stored_tensor_bytes(out)
    assert e["derived_blobs"] == derived >= 200
    assert abs(e["estimated_bytes"] - stored) <= 0.05 * stored, (e, stored)
    assert e["estimated_bytes"] < 0.5 * off["estimated_bytes"]


def test_analyze_reports_derivable_bytes(ladder, tmp_path):
    from typer.testing import CliRunner

    from tdedup.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["analyze", "--json", *ladder[:1], ladder[4]])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["derived"]
    assert row["model"] == "q4_0-gguf" and row["base_model"] == "f32-safetensors"
    assert row["transform"] == "Q4_0 quantization"
    assert row["derivable_bytes"] == sum(row["transforms"].values()) > 0.9 * row["tensor_bytes"]
    md = tmp_path / "r.md"
    res = runner.invoke(app, ["analyze", *ladder[:1], ladder[4], "--markdown", str(md)])
    assert res.exit_code == 0 and "Derivable from another model" in res.stdout
    assert "| q4\\_0-gguf |" in md.read_text() or "| q4_0-gguf |" in md.read_text()


def _ladder_round_trip(args: list[str], tmp_path: Path, min_derived: int) -> None:
    """Pack (derive on by default), unpack byte-exact, load bit-exact against the files."""
    torch = pytest.importorskip("torch")
    res = tdedup.pack(args, tmp_path / "l.tdd")
    assert res.encodings.get("derived_xor_byteplane_zstd", 0) >= min_derived, res.encodings
    tdedup.unpack(tmp_path / "l.tdd", tmp_path / "out")
    paths = {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in args}
    for name, path in paths.items():
        assert _sha(tmp_path / "out" / name / path.name) == _sha(path), name
    loaded = tdedup.load(tmp_path / "l.tdd", device="cpu")
    for name, path in paths.items():
        if path.suffix == ".gguf":
            for t in gguf.GGUFReader(path).tensors:
                want = np.asarray(t.data).reshape(-1).view(np.uint8)
                got = loaded[name][t.name].contiguous().view(torch.uint8).reshape(-1).numpy()
                assert np.array_equal(got, want), (name, t.name)
        else:
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    want = f.get_tensor(k)
                    got = loaded[name][k]
                    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (name, k)


@pytest.mark.corpus
def test_corpus_minilm_ladder_round_trips(corpus, tmp_path):
    """F32 safetensors, its F16/BF16 casts, gguf-py's F32/F16/Q8_0 GGUF of it."""
    args = [f"st-f32={corpus / 'minilm/base/model.safetensors'}",
            f"st-f16={corpus / 'minilm/f16.safetensors'}",
            f"st-bf16={corpus / 'minilm/bf16.safetensors'}",
            *[f"g-{t}={corpus / 'minilm-gguf' / f'{t}.gguf'}" for t in ("f32", "f16", "q8_0")]]
    _ladder_round_trip(args, tmp_path, min_derived=200)


@pytest.mark.corpus
@pytest.mark.llamacpp
def test_llama_quantize_ladder_round_trips(corpus, tmp_path):
    """llama-quantize's Q4_K_M, Q6_K, Q5_1 and Q4_0 of the corpus's F32 GGUF."""
    import subprocess

    from helpers.llamacpp import llama_env

    env = llama_env()
    if env is None:
        pytest.skip("llama.cpp not built (bash shared/tools/llama-cpp.sh)")
    src = corpus / "minilm-gguf" / "f32.gguf"
    args = [f"f32={src}"]
    for q in ("Q4_K_M", "Q6_K", "Q5_1", "Q4_0"):
        out = tmp_path / f"{q.lower()}.gguf"
        subprocess.run([env["LLAMA_QUANTIZE"], str(src), str(out), q, "1"], check=True,
                       capture_output=True)
        args.append(f"{q.lower()}={out}")
    _ladder_round_trip(args, tmp_path, min_derived=140)  # identical tensors are shared


@pytest.mark.corpus
@slow
def test_corpus_smollm_requantized_family_round_trips(corpus, tmp_path):
    """Q4_1 as shipped and gguf-py's F16 and Q8_0 requantizations (~50 s)."""
    args = [f"{n}={corpus / 'smollm' / f'{n}.gguf'}" for n in ("q4_1", "q8_0", "f16")]
    _ladder_round_trip(args, tmp_path, min_derived=400)


def test_cuda_code_path_on_the_host_decodes_derived_blobs(ladder, tmp_path, monkeypatch):
    """``place_cuda`` with host buffers (as test_load does): derived blobs are decoded on
    the host from their base's device copy, then uploaded, and come out bit-exact."""
    torch = pytest.importorskip("torch")
    from helpers.host_staging import host_staging
    from tdedup.loaders import placement as pl

    bundle = tmp_path / "b.tdd"
    tdedup.pack(ladder, bundle)
    host_staging(monkeypatch)
    with tdedup.open_bundle(bundle) as b:
        order, depth = pl.blob_order(b, [t.hash for m in b.manifest.models
                                          for f in m.files for t in f.tensors if t.length])
        assert any(r.encoding is BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD for r in order)
        placer = pl.Placer(b, torch.device("cpu"), depth, verify=True, workers=1)
        placer.place_cuda(order)
        for rec in order:
            assert placer.blobs[rec.hash].numpy().tobytes() == \
                np.asarray(b.read_blob(rec.hash)).tobytes()


@pytest.mark.gpu
def test_load_derived_on_cuda(ladder, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tdedup.pack(ladder, tmp_path / "b.tdd")
    on_gpu = tdedup.load(tmp_path / "b.tdd", device="cuda", verify=True)
    on_cpu = tdedup.load(tmp_path / "b.tdd", device="cpu")
    for model in on_cpu:
        for name, t in on_cpu[model].items():
            got = on_gpu[model][name]
            assert got.is_cuda and torch.equal(got.cpu().view(torch.uint8), t.view(torch.uint8))


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_damaged_derived_blobs_fail_cleanly(data):
    """Any byte of a derived blob changed: a TdedupError or the right bytes, never a crash."""
    x = np.random.default_rng(4).standard_normal((2, 256)).astype(np.float32)
    chains = [(Transform(TransformKind.QUANTIZE, type_number("Q4_K")),),
              (Transform(TransformKind.CAST, type_number("F16")),),
              (Transform(TransformKind.TRANSPOSE, 0),),
              (Transform(TransformKind.QUANTIZE, type_number("Q8_0")),
               Transform(TransformKind.DEQUANTIZE, type_number("BF16")))]
    chain = data.draw(st.sampled_from(chains))
    from tdedup.format.codecs.transforms import TypedTensor, apply_chain
    actual = apply_chain(chain, TypedTensor.of(x.tobytes(), "F32", x.shape)).tobytes()
    stored = bytearray(encode_derived(actual, x.tobytes(), chain, "F32", x.shape))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, min(len(stored) - 1, 80)))
        stored[i] = data.draw(st.integers(0, 255))
    try:
        out = decode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, bytes(stored), len(actual),
                     base=x.tobytes())
    except TdedupError:
        return
    assert len(bytes(out)) == len(actual)


def test_a_tensor_the_transform_misses_round_trips_through_its_residual(ladder, tmp_path):
    """A Q4_0 file whose blocks were edited by hand: still derived (most bytes agree), the
    residual carries the edits, and unpack gives back the very bytes."""
    src = Path(ladder[4].split("=", 1)[1])
    edited = tmp_path / "edited.gguf"
    data = bytearray(src.read_bytes())
    t = next(t for t in gguf.GGUFReader(src).tensors if t.tensor_type.name == "Q4_0")
    start = int(t.data_offset)
    for i in range(0, int(t.n_bytes), 997):
        data[start + i] ^= 0x5A
    edited.write_bytes(bytes(data))
    args = [ladder[0], f"edited={edited}"]
    res = tdedup.pack(args, tmp_path / "e.tdd")
    assert res.encodings.get("derived_xor_byteplane_zstd", 0) == 4
    from tdedup.format.codecs.byteplane import byteplane_decompress

    nonzero = 0
    with tdedup.open_bundle(tmp_path / "e.tdd") as b:
        for r in b.manifest.blobs.values():
            if r.encoding is BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD:
                stored = b.stored_bytes(r)
                end = parse_derived(stored)[3]
                nonzero += np.count_nonzero(np.frombuffer(
                    byteplane_decompress(stored[end:], r.decoded_length), np.uint8))
    assert nonzero == len(range(0, int(t.n_bytes), 997))  # the residual holds the edits
    tdedup.unpack(tmp_path / "e.tdd", tmp_path / "out")
    assert _sha(tmp_path / "out" / "edited" / "edited.gguf") == _sha(edited)


def test_serving_layout_keeps_the_same_derived_blobs_and_converts(ladder, tmp_path):
    """Serving makes compact's choices (derived blobs and layout references included) and
    keeps self-contained winners raw; convert between the two gives the same blobs."""
    compact = tmp_path / "c.tdd"
    serving = tmp_path / "s.tdd"
    tdedup.pack(ladder, compact)
    tdedup.pack(ladder, serving, layout="serving")

    def based(path):
        with tdedup.open_bundle(path) as b:
            blobs = b.manifest.blobs
            assert all(r.encoding is BlobEncoding.RAW for r in blobs.values() if r.base is None)\
                or path == compact
            return {h: (r.encoding, r.base) for h, r in blobs.items() if r.base is not None}

    assert based(serving) == based(compact) != {}
    tdedup.convert(compact, tmp_path / "c2s.tdd", "serving")
    assert based(tmp_path / "c2s.tdd") == based(serving)
    tdedup.unpack(serving, tmp_path / "out")
    for arg in ladder:
        name, path = arg.split("=", 1)
        assert _sha(tmp_path / "out" / name / Path(path).name) == _sha(Path(path))


def test_names_join_across_conventions_whatever_the_gguf_holds(tmp_path):
    """gguf-py's name map also joins two safetensors checkpoints named by different
    conventions (HF's ``model.layers.0.self_attn.q_proj`` and Meta's
    ``layers.0.attention.wq``): an F16 cast is found across them with a llama GGUF in the
    set whatever that GGUF's sizes (a rule that built maps only for GGUF sizes lost it),
    and with the map cut to the blocks the names can hold."""
    from helpers.factory import make_gguf, make_safetensors
    from tdedup.analyzers.derivation import derivation_report

    rng = np.random.default_rng(5)
    q, k = (rng.standard_normal((128, 128)).astype(np.float32) for _ in range(2))
    hf = make_safetensors(tmp_path / "hf.safetensors",
                          {"model.layers.1.self_attn.q_proj.weight": q,
                           "model.layers.1.self_attn.k_proj.weight": k})
    meta = make_safetensors(tmp_path / "meta.safetensors",
                            {"layers.1.attention.wq.weight": q.astype(np.float16),
                             "layers.1.attention.wk.weight": k.astype(np.float16)})
    other = make_gguf(tmp_path / "other.gguf", {
        f"blk.{b}.attn_q.weight": rng.standard_normal((32, 32)).astype(np.float32)
        for b in range(4)}, arch="llama")
    scanned = hash_models(index_models([f"hf={hf}", f"meta={meta}", f"other={other}"]))
    got = [d.to_dict() for d in derivation_report(scanned)]
    assert [(d["model"], d["base_model"], d["transform"], d["fraction"]) for d in got] == [
        ("meta", "hf", "cast to F16", 1.0)]
