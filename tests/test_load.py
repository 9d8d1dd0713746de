"""``tdedup.load`` on CPU: every tensor bit for bit, shared tensors stored once, GGUF types,
delta blobs, verification, ``load_into`` on meta modules, the ``tdedup load`` command.

Integrations with transformers and diffusers are in tests/test_load_integrations.py, the
CUDA path in tests/test_load_gpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tdedup  # noqa: E402
from tdedup.errors import IntegrityError, LoadError, ModelNotFoundError  # noqa: E402
from tdedup.format.bundle.constants import BlobEncoding  # noqa: E402
from tdedup.loaders import modules as tm  # noqa: E402
from tdedup.loaders import torch as tl  # noqa: E402
from tdedup.loaders import placement as pl  # noqa: E402
from tdedup.loaders import staging as sg  # noqa: E402
from tdedup.loaders.stream import DELTA_OPS, PREDICTED  # noqa: E402

from helpers.bundle_helpers import flip  # noqa: E402
from helpers.host_staging import host_staging  # noqa: E402


def as_bytes(t) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_matches_safetensors(state: dict, path: Path, prefix: str = "") -> None:
    """Every tensor of a safetensors file, as safetensors loads it, is in ``state``
    (under ``prefix``) with its dtype, shape and bytes."""
    from safetensors.torch import load_file

    for name, want in load_file(str(path)).items():
        got = state[prefix + name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert as_bytes(got) == as_bytes(want), name


def pack(tmp: Path, sources: dict[str, Path], **kw) -> Path:
    out = tmp / "b.tdd"
    tdedup.pack([f"{n}={p}" for n, p in sources.items()], out, **kw)
    return out


@pytest.fixture(scope="module")
def bert_bundle(bert_family, tmp_path_factory) -> Path:
    return pack(tmp_path_factory.mktemp("bert-bundle"), bert_family)


# -- safetensors families -------------------------------------------------------------

def test_every_tensor_bit_for_bit_and_shared_once(bert_bundle, bert_family):
    loaded = tdedup.load(bert_bundle, device="cpu")
    assert sorted(loaded) == sorted(bert_family)
    for name, folder in bert_family.items():
        for f in sorted(folder.glob("*.safetensors")):
            assert_matches_safetensors(loaded[name], f)
        assert set(loaded[name]) == {k for f in folder.glob("*.safetensors")
                                     for k in _keys(f)}
    # Identical tensors are one tensor; changed ones are not.
    base, frozen, tuned = loaded["base"], loaded["frozen"], loaded["finetune"]
    for key, t in base.items():
        for other in (loaded["resaved"], loaded["sharded"]):
            assert other[key].data_ptr() == t.data_ptr(), key
        if key.startswith(("embeddings.", "encoder.layer.0.")):
            assert frozen[key] is t
        if key.startswith("encoder.layer.1."):
            assert frozen[key].data_ptr() != t.data_ptr()
            assert tuned[key].data_ptr() != t.data_ptr()
    s = loaded.stats
    assert s.models["base"] == sum(t.nbytes for t in base.values())
    assert s.logical_bytes == sum(s.models.values())
    ptrs = {t.data_ptr(): t.nbytes for sd in loaded.values() for t in sd.values()}
    assert s.device_bytes == sum(ptrs.values())
    assert s.saved_bytes == s.logical_bytes - s.device_bytes > 2 * s.models["base"]


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return list(f.keys())


def test_models_subset_and_errors(bert_bundle, monkeypatch):
    loaded = tdedup.load(bert_bundle, device="cpu", models=["frozen", "base", "frozen"])
    assert list(loaded) == ["frozen", "base"]
    assert loaded.stats.device_bytes < loaded.stats.logical_bytes
    with pytest.raises(KeyError, match="not loaded"):
        loaded["finetune"]
    with pytest.raises(tdedup.TdedupError, match="not loaded"):  # one except for both
        loaded.record("finetune")
    assert json.loads(loaded.read_file("base", "config.json"))["model_type"] == "bert"
    loaded.close()
    with pytest.raises(ModelNotFoundError, match="nope"):
        tdedup.load(bert_bundle, device="cpu", models=["nope"])
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="CUDA is not available"):
            tdedup.load(bert_bundle, device="cuda")
        assert tdedup.load(bert_bundle).device.type == "cpu"  # the default: auto
    from tdedup.loaders import deps
    monkeypatch.setattr(deps, "torch", None)
    with pytest.raises(LoadError, match="needs PyTorch") as e:
        tdedup.load(bert_bundle, device="cpu")
    assert "tdedup[torch]" in e.value.hint


def test_dtypes_views_and_empty_tensors(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(6, 5, generator=g)
    tensors = {
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64), "f32": f32,
        "f16": f32.half(), "bf16": f32.bfloat16(),
        "i64": torch.arange(-5, 5), "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.arange(9, dtype=torch.int16), "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(200, 256, dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "f8_e4m3": f32.to(torch.float8_e4m3fn), "f8_e5m2": f32.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "zeros16": torch.zeros(8, dtype=torch.float16),
        "zerosbf": torch.zeros(8, dtype=torch.bfloat16),  # same bytes as zeros16
        "noise": torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=g),  # raw
    }
    path = tmp_path / "m" / "model.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    loaded = tdedup.load(pack(tmp_path, {"m": path.parent}), device="cpu")
    state = loaded["m"]
    assert_matches_safetensors(state, path)
    assert state["zeros16"].data_ptr() == state["zerosbf"].data_ptr()
    assert state["zeros16"].dtype == torch.float16 and state["zerosbf"].dtype == torch.bfloat16
    assert loaded.stats.mapped_bytes >= 1 << 16  # the incompressible blob is a map view
    state["noise"][0] += 1  # a private map: writable, and the bundle file is untouched
    assert as_bytes(tdedup.load(loaded.path, device="cpu")["m"]["noise"]) == \
        as_bytes(tensors["noise"])
    info = loaded.info("m")["bf16"]
    assert (info.dtype, info.shape, info.file) == ("BF16", (6, 5), "model.safetensors")


# -- GGUF -----------------------------------------------------------------------------

def test_gguf_types_blocks_and_dequantize(tmp_path, gguf_family):
    import gguf
    from gguf.quants import dequantize

    sources = dict(gguf_family)
    loaded = tdedup.load(pack(tmp_path, sources), device="cpu")
    split = loaded["split"]  # every part of a split GGUF, one state dict
    assert split.keys() == loaded["f32"].keys()
    assert all(split[k] is loaded["f32"][k] for k in split)
    deq = tdedup.load(tmp_path / "b.tdd", device="cpu", dequantize=True)
    for name in ("f32", "q8_0", "retagged"):
        reader = gguf.GGUFReader(sources[name])
        for t in reader.tensors:
            got = loaded[name][t.name]
            assert got.numpy().tobytes() == np.asarray(t.data).tobytes(), t.name
            assert got.shape == tuple(np.asarray(t.data).shape), t.name
            info = loaded.info(name)[t.name]
            assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
            if t.tensor_type == gguf.GGMLQuantizationType.F32:
                assert got.dtype == torch.float32 and info.ggml_type is None
                assert deq[name][t.name] is deq[name][t.name]
            else:
                assert got.dtype == torch.uint8 and info.ggml_type == t.tensor_type.name
                want = dequantize(np.asarray(t.data), t.tensor_type)
                d = deq[name][t.name]
                assert d.dtype == torch.float32 and d.shape == info.shape
                assert np.array_equal(d.numpy(), want.reshape(info.shape))
                assert deq.info(name)[t.name].dequantized
    # Cross-format identity: the F32 GGUF tensor and the safetensors one are one blob.
    st = loaded["safetensors"]
    assert loaded["f32"]["token_embd.weight"].data_ptr() == st["token_embd.weight"].data_ptr()
    assert loaded["retagged"]["token_embd.weight"] is loaded["f32"]["token_embd.weight"]


def test_keys_of_several_weight_files(tmp_path, gguf_family, diffusers_pipeline):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("f32", "q8_0"):
        (folder / f"{name}.gguf").write_bytes(gguf_family[name].read_bytes())
    loaded = tdedup.load(pack(tmp_path, {"two": folder, "ddpm": diffusers_pipeline}),
                         device="cpu")
    keys = set(loaded["two"])
    assert "f32.gguf:token_embd.weight" in keys and "q8_0.gguf:token_embd.weight" in keys
    assert "f32.gguf:blk.0.attn_norm.weight" in keys
    unet = loaded.component("ddpm", "unet")
    assert unet and all(f"unet/{k}" in loaded["ddpm"] or k in loaded["ddpm"] for k in unet)
    assert_matches_safetensors(unet, diffusers_pipeline / "unet" /
                               "diffusion_pytorch_model.safetensors")
    assert tl.weight_variant("unet/diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert tl.weight_variant("text_encoder/model-00001-of-00002.safetensors") is None


# -- deltas ---------------------------------------------------------------------------

DELTAS = [e for e in BlobEncoding if e.is_delta and not e.any_length_base]  # 24, 25: test_derived


def pack_with_deltas(tmp: Path, bert_family: dict, monkeypatch, encoding) -> Path:
    """Pack base and finetune, every changed tensor of finetune forced to be a delta of
    ``encoding`` against base's tensor of the same name (pack keeps it if smaller)."""
    pytest.importorskip("tdedup.format.codecs.delta")
    from tdedup.analyzers.delta_planning import DeltaChoice
    from tdedup.ops import pack as pack_module
    from tdedup.format.checkpoints.dtypes import element_width

    def plan(scanned, delta, decided=None):
        base = {h.record.name: h.key for h in scanned.hashed["base"]}
        return {h.key: DeltaChoice(base=base[h.record.name], encoding=encoding,
                                   width=element_width(h.record.dtype), estimated_bytes=0,
                                   shape=h.record.shape)
                for h in scanned.hashed["finetune"]
                if h.record.name in base and base[h.record.name] != h.key}

    monkeypatch.setattr(pack_module, "_plan_deltas", plan)
    return pack(tmp, {"base": bert_family["base"], "finetune": bert_family["finetune"]})


@pytest.mark.parametrize("encoding", DELTAS, ids=[e.name for e in DELTAS])
def test_delta_blobs(tmp_path, bert_family, monkeypatch, encoding):
    """Every delta encoding the format has, forced on each changed tensor, loads to the
    fine-tune's bytes (streamed ones finished by ``combine``, others decoded whole)."""
    bundle = pack_with_deltas(tmp_path, bert_family, monkeypatch, encoding)
    with tdedup.open_bundle(bundle) as b:
        used = {r.encoding for r in b.manifest.blobs.values()}
    assert encoding in used
    for verify, workers in ((False, 1), (True, 3)):  # threads decode one depth at a time
        loaded = tdedup.load(bundle, device="cpu", verify=verify, workers=workers)
        assert_matches_safetensors(loaded["finetune"],
                                   bert_family["finetune"] / "model.safetensors")
        assert_matches_safetensors(loaded["base"], bert_family["base"] / "model.safetensors")


@pytest.mark.parametrize("encoding", [None, "XOR_BYTEPLANE_ZSTD", "ZIGZAG_SUB_BYTEPLANE_ZSTD",
                                      "DECAY_SUB_BYTEPLANE_ZSTD",
                                      "LOWRANK_SUB_BYTEPLANE_ZSTD"])
def test_cuda_code_path_on_the_host(tmp_path, bert_family, monkeypatch, encoding):
    """``place_cuda`` (chunked staging, byte planes interleaved and rotated back after the
    upload, deltas finished after it, verification) run with host buffers, so that it is
    exercised where there is no GPU; every blob bit for bit against the numpy decoder."""
    if encoding is None:  # the family is F32 (rotated by 3): F16 by 1, F64 plain planes
        from safetensors.torch import save_file

        (tmp_path / "half").mkdir()
        g = torch.Generator().manual_seed(3)
        save_file({"h": (torch.randn(96, 64, generator=g) * 0.02).half(),
                   "d": torch.randn(32, 64, generator=g, dtype=torch.float64)},
                  str(tmp_path / "half" / "model.safetensors"))
        bundle = pack(tmp_path, {**bert_family, "half": tmp_path / "half"})
    else:
        bundle = pack_with_deltas(tmp_path, bert_family, monkeypatch,
                                  BlobEncoding[encoding])
    stager = host_staging(monkeypatch)
    with tdedup.open_bundle(bundle) as b:
        order, depth = pl.blob_order(b, [t.hash for m in b.manifest.models
                                          for f in m.files for t in f.tensors if t.length])
        if encoding is not None:
            assert any(r.encoding is BlobEncoding[encoding] for r in order)
        # Two workers: each chunk's planes are decompressed on a pool (test_derived: one).
        placer = pl.Placer(b, torch.device("cpu"), depth, verify=True, workers=2)
        placer.place_cuda(order)
        for rec in order:
            assert placer.blobs[rec.hash].numpy().tobytes() == \
                np.asarray(b.read_blob(rec.hash)).tobytes()
    # Every byte-plane blob and residual went plane-major, interleaved "on the device";
    # chunks of 4096 bytes split each blob across many steps and both buffers.
    planes = (BlobEncoding.BYTEPLANE_ZSTD, BlobEncoding.ROTATED_BYTEPLANE_ZSTD,
              BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD)
    planar = [r for r in order
              if r.encoding in planes or r.encoding in DELTA_OPS or r.encoding in PREDICTED]
    assert len(stager.planar) == len(planar) and None not in stager.pools
    encodings = {r.encoding for r in planar}
    if encoding is None:
        assert set(planes) <= encodings
        assert "RotatedPlaneReader" in stager.planar
    else:
        assert BlobEncoding[encoding] in encodings


@pytest.mark.parametrize("op,width", [("xor", 4), ("add", 1), ("add", 2), ("add", 4),
                                      ("add", 8), ("zigzag-add", 2), ("zigzag-add", 4),
                                      ("zigzag-add", 8)])
def test_combine_matches_numpy(op, width, monkeypatch):
    rng = np.random.default_rng(width)
    base = rng.integers(0, 256, 8 * 40, dtype=np.uint8)
    res = rng.integers(0, 256, 8 * 40, dtype=np.uint8)
    ut = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    b, r = base.view(ut), res.view(ut)
    if op == "xor":
        want = base ^ res
    else:
        if op == "zigzag-add":
            r = (r >> ut(1)) ^ (-(r & ut(1))).astype(ut)
        want = (b + r).view(np.uint8)
    out = torch.from_numpy(res.copy())
    sg.combine(out, torch.from_numpy(base), op, width)
    assert out.numpy().tobytes() == want.tobytes()


# -- verification ---------------------------------------------------------------------

def test_verify_finds_corruption_before_handing_out(tmp_path, bert_family):
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({"noise": torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=g),
               "w": torch.randn(64, 64, generator=g)}, str(folder / "model.safetensors"))
    bundle = pack(tmp_path, {"m": folder, "base": bert_family["base"]})
    with tdedup.open_bundle(bundle) as b:
        by_enc = {}
        for f in b.model("m").files:
            for t in f.tensors:
                by_enc[b.blob(t.hash).encoding] = b.blob(t.hash)
    assert BlobEncoding.RAW in by_enc
    assert {BlobEncoding.BYTEPLANE_ZSTD, BlobEncoding.ROTATED_BYTEPLANE_ZSTD,
            BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD} & set(by_enc)
    for enc, rec in by_enc.items():
        damaged = tmp_path / f"damaged-{enc.name}.tdd"
        damaged.write_bytes(bundle.read_bytes())
        flip(damaged, rec.offset + rec.stored_length - 1)  # deep in the data, not a header
        with pytest.raises(IntegrityError, match=r"used by m\b"):
            tdedup.load(damaged)  # verify=True is the default
        with pytest.raises(IntegrityError):
            tdedup.load(damaged, device="cpu", models=["m"], verify=True)
        tdedup.load(damaged, device="cpu", models=["base"])  # untouched


def test_a_flipped_byte_in_a_delta_is_refused_by_default(tmp_path, bert_family, monkeypatch):
    bundle = pack_with_deltas(tmp_path, bert_family, monkeypatch,
                              BlobEncoding.ZIGZAG_SUB_BYTEPLANE_ZSTD)
    with tdedup.open_bundle(bundle) as b:
        rec = max((r for r in b.manifest.blobs.values() if r.base is not None),
                  key=lambda r: r.stored_length)
    flip(bundle, rec.offset + rec.stored_length // 2)
    with pytest.raises(IntegrityError, match="checksum"):
        tdedup.load(bundle)
    assert tdedup.load(bundle, models=["base"])["base"]  # base does not read the delta


def test_truncated_frame_is_an_integrity_error(tmp_path, bert_bundle):
    with tdedup.open_bundle(bert_bundle) as b:
        rec = max(b.manifest.blobs.values(), key=lambda r: r.decoded_length)
    assert rec.encoding in (BlobEncoding.BYTEPLANE_ZSTD, BlobEncoding.ROTATED_BYTEPLANE_ZSTD,
                            BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD)
    damaged = tmp_path / "d.tdd"
    damaged.write_bytes(bert_bundle.read_bytes())
    flip(damaged, rec.offset + 4 + 8 * 4 + 40, 0xFF)  # inside the first plane's frame
    with pytest.raises(IntegrityError):
        tdedup.load(damaged, device="cpu", verify=True)


def test_a_broken_plane_on_the_cuda_path_is_an_integrity_error(tmp_path, bert_bundle,
                                                              monkeypatch):
    """Planes decompressed side by side on the CUDA path: a plane zstd refuses (on a
    thread of the pool) is one IntegrityError naming the blob, on the loading thread."""
    from tdedup.loaders import stream

    with tdedup.open_bundle(bert_bundle) as b:
        rec = max(b.manifest.blobs.values(), key=lambda r: r.decoded_length)
    readinto = stream.ZstdReader.readinto

    def broken(self, out) -> None:
        if self.what.endswith("(plane 1)"):
            raise IntegrityError(f"{self.what}: zstd data is corrupted (test)")
        readinto(self, out)

    monkeypatch.setattr(stream.ZstdReader, "readinto", broken)
    stager = host_staging(monkeypatch)
    with tdedup.open_bundle(bert_bundle) as b:
        order, depth = pl.blob_order(b, [rec.hash])
        placer = pl.Placer(b, torch.device("cpu"), depth, verify=False, workers=4)
        with pytest.raises(IntegrityError) as err:
            placer.place_cuda(order)
    assert err.value.blob == rec.hash and "plane 1" in str(err.value)
    assert stager.pools[0] is not None


# -- modules --------------------------------------------------------------------------

class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2)
        self.register_buffer("steps", torch.arange(3), persistent=False)


def test_load_into_meta_modules_share_storage(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    one, two = Tiny(), Tiny()
    two.a.load_state_dict(one.a.state_dict())  # "a" shared, "b" differs
    for name, m in (("one", one), ("two", two)):
        (tmp_path / name).mkdir()
        save_file(m.state_dict(), str(tmp_path / name / "model.safetensors"))
    loaded = tdedup.load(pack(tmp_path, {"one": tmp_path / "one", "two": tmp_path / "two"}),
                         device="cpu")
    built = {}
    for name in ("one", "two"):
        with tm.empty_init():
            m = Tiny()
        assert m.a.weight.is_meta and not m.steps.is_meta
        tdedup.load_into(m, loaded, name)
        assert not tm.meta_tensors(m)
        built[name] = m
    x = torch.randn(5, 4)
    for name, ref in (("one", one), ("two", two)):
        assert torch.equal(built[name].b(built[name].a(x)), ref.b(ref.a(x)))
    assert built["one"].a.weight.data_ptr() == built["two"].a.weight.data_ptr()
    assert built["one"].b.weight.data_ptr() != built["two"].b.weight.data_ptr()
    assert isinstance(built["one"].a.weight, torch.nn.Parameter)
    with torch.device("meta"):
        bigger = torch.nn.Linear(4, 9)
    with pytest.raises(LoadError, match="does not fit"):
        tdedup.load_into(bigger, loaded, "one", prefix="a.")
    with pytest.raises(LoadError, match="unexpected"):
        tdedup.load_into(torch.nn.Linear(4, 3), loaded, "one")
    lin = torch.nn.Linear(4, 3, device="meta")
    tdedup.load_into(lin, loaded, "one", prefix="a.")
    assert lin.weight.data_ptr() == built["one"].a.weight.data_ptr()


# -- CLI ------------------------------------------------------------------------------

def test_cli_load_report(bert_bundle):
    from typer.testing import CliRunner

    from tdedup.cli.app import app

    runner = CliRunner()
    r = runner.invoke(app, ["load", str(bert_bundle)])  # device auto: the CPU here
    assert r.exit_code == 0, r.output
    assert "base" in r.output and "saved" in r.output and "logical" in r.output
    assert "without sharing" in r.output and "with sharing" in r.output
    assert "total" in r.output
    assert "GB/s" in r.output and "checksums verified" in r.output
    r = runner.invoke(app, ["load", str(bert_bundle), "-d", "cpu", "-m", "base", "-m",
                            "frozen", "--json", "--no-verify"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert list(doc["models"]) == ["base", "frozen"]
    assert doc["saved_bytes"] == doc["logical_bytes"] - doc["device_bytes"] > 0
    base, frozen = doc["models"]["base"], doc["models"]["frozen"]
    # The first model adds all of its bytes; the second only what it does not share.
    assert base["with_sharing_bytes"] == base["logical_bytes"] and base["saved_bytes"] == 0
    assert 0 < frozen["with_sharing_bytes"] < frozen["logical_bytes"]
    assert frozen["saved_bytes"] == frozen["logical_bytes"] - frozen["with_sharing_bytes"]
    assert base["with_sharing_bytes"] + frozen["with_sharing_bytes"] <= doc["device_bytes"]
    assert doc["seconds"] > 0 and doc["gb_per_s"] > 0 and doc["verified"] is False
    r = runner.invoke(app, ["load", str(bert_bundle), "-d", "cpu", "-m", "nope"])
    assert r.exit_code == 2 and "no model 'nope'" in r.output
    r = runner.invoke(app, ["load", str(bert_bundle), "-d", "tpu"])
    assert r.exit_code == 2


def test_cli_progress_bar_only_for_loads_over_a_second(monkeypatch):
    from contextlib import ExitStack, contextmanager

    from tdedup.cli import load as cli_load

    calls: list = []

    @contextmanager
    def bar(quiet):
        calls.append("open")
        yield lambda phase, n, total: calls.append((n, total))

    monkeypatch.setattr(cli_load, "phased_progress", bar)
    with ExitStack() as stack:
        late = cli_load._LateBar(stack, False)
        late(10, 100)
        assert calls == []  # under a second: no bar
        late.t0 -= 2
        late(30, 100)
        late(100, 100)
    assert calls == ["open", (30, 100), (70, 100)]
