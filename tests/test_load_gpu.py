"""``tdedup.load`` on CUDA: pinned staging, deltas finished on the device, verification,
rebuilt models. Skipped without a CUDA device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import tdedup  # noqa: E402
from tdedup.errors import IntegrityError  # noqa: E402
from tdedup.format.bundle.constants import BlobEncoding  # noqa: E402
from tdedup.loaders import staging as sg  # noqa: E402

from helpers.bundle_helpers import flip  # noqa: E402
from test_load import (as_bytes, assert_matches_safetensors, pack,  # noqa: E402
                       pack_with_deltas)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def small_staging(monkeypatch):
    """Staging buffers of 4 KiB: every blob crosses several chunks and both buffers."""
    monkeypatch.setattr(sg, "STAGING_BYTES", 4096)
    monkeypatch.setattr(sg.Stager, "_cache", {})


def test_cuda_bit_for_bit_and_shared(tmp_path, bert_family, gguf_family, small_staging):
    bundle = pack(tmp_path, {**bert_family, "gguf": gguf_family["q8_0"],
                             "gguf32": gguf_family["f32"]})
    cpu = tdedup.load(bundle, device="cpu")
    gpu = tdedup.load(bundle, device="cuda")
    assert gpu.device.type == "cuda"
    for name in cpu:
        assert cpu[name].keys() == gpu[name].keys()
        for key, t in cpu[name].items():
            g = gpu[name][key]
            assert g.is_cuda and g.dtype == t.dtype and g.shape == t.shape, key
            assert as_bytes(g) == as_bytes(t), (name, key)
    for key, t in gpu["base"].items():
        assert gpu["resaved"][key].data_ptr() == t.data_ptr()
    assert gpu.stats.device_bytes == cpu.stats.device_bytes
    assert gpu.stats.logical_bytes == cpu.stats.logical_bytes
    deq = tdedup.load(bundle, device="cuda", models=["gguf"], dequantize=True)
    ref = tdedup.load(bundle, device="cpu", models=["gguf"], dequantize=True)
    for key, t in ref["gguf"].items():
        assert torch.equal(deq["gguf"][key].cpu(), t), key


DELTAS = [e for e in BlobEncoding if e.is_delta and not e.any_length_base]  # 24, 25: test_derived


@pytest.mark.parametrize("encoding", DELTAS, ids=[e.name for e in DELTAS])
def test_cuda_deltas(tmp_path, bert_family, monkeypatch, small_staging, encoding):
    bundle = pack_with_deltas(tmp_path, bert_family, monkeypatch, encoding)
    for verify in (False, True):
        loaded = tdedup.load(bundle, device="cuda", verify=verify)
        assert_matches_safetensors(loaded["finetune"],
                                   bert_family["finetune"] / "model.safetensors")


def test_cuda_verify_finds_corruption(tmp_path, bert_family):
    bundle = pack(tmp_path, {"base": bert_family["base"]})
    with tdedup.open_bundle(bundle) as b:
        rec = max(b.manifest.blobs.values(), key=lambda r: r.decoded_length)
    flip(bundle, rec.offset + rec.stored_length - 1)
    with pytest.raises(IntegrityError):
        tdedup.load(bundle, device="cuda", verify=True)


def test_cuda_rebuilt_bert_matches_cpu(tmp_path, bert_family):
    pytest.importorskip("transformers")
    from tdedup.loaders.transformers import from_bundle

    bundle = pack(tmp_path, {"base": bert_family["base"], "frozen": bert_family["frozen"]})
    gpu = tdedup.load(bundle, device="cuda")
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for name in ("base", "frozen"):
        m = from_bundle(gpu, name)
        assert all(p.is_cuda for p in m.parameters()) and all(b.is_cuda for b in m.buffers())
        ref = from_bundle(bundle, name, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids.cuda()).last_hidden_state.cpu(),
                                       ref(input_ids=ids).last_hidden_state,
                                       rtol=1e-4, atol=1e-4)
    a = from_bundle(gpu, "base").embeddings.word_embeddings.weight
    b = from_bundle(gpu, "frozen").embeddings.word_embeddings.weight
    assert a.data_ptr() == b.data_ptr()


def test_cuda_models_equal_from_pretrained_nothing_on_meta(tmp_path, bert_family):
    """On CUDA: from_bundle equals from_pretrained moved to the GPU; the meta-device
    recipe gets its recomputed buffers on the GPU; a CPU-loaded bundle is moved once."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig, BertModel

    bundle = pack(tmp_path, {"base": bert_family["base"], "resaved": bert_family["resaved"]})
    gpu = tdedup.load(bundle, device="cuda")
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    for name in ("base", "resaved"):
        ref = BertModel.from_pretrained(bert_family[name]).to("cuda").eval()
        with torch.device("meta"):
            meta = BertModel(AutoConfig.from_pretrained(bert_family[name]))
        tdedup.load_into(meta, gpu, name)
        for m in (tdedup.from_bundle(gpu, name), meta.eval()):
            assert all(t.is_cuda for t in [*m.parameters(), *m.buffers()])
            assert not any(p.requires_grad for p in m.parameters())
            with torch.no_grad():
                torch.testing.assert_close(m(input_ids=ids).last_hidden_state,
                                           ref(input_ids=ids).last_hidden_state,
                                           rtol=1e-5, atol=1e-5)
    cpu = tdedup.load(bundle, device="cpu")
    a, b = (tdedup.from_bundle(cpu, n, device="cuda") for n in ("base", "resaved"))
    wa, wb = (m.embeddings.word_embeddings.weight for m in (a, b))
    assert wa.is_cuda and wa.data_ptr() == wb.data_ptr()  # moved once, shared
    own = tdedup.private(a)
    assert all(p.is_cuda and p.requires_grad for p in own.parameters())


def test_cuda_pipelines_share_modules(tmp_path):
    pytest.importorskip("diffusers")
    from test_load_integrations import _tiny_sd_pair

    sources = _tiny_sd_pair(tmp_path)
    pipes = tdedup.pipelines(pack(tmp_path, sources), list(sources), device="cuda")
    a, b = pipes["sd-a"], pipes["sd-b"]
    assert a.text_encoder is b.text_encoder and a.vae is b.vae and a.unet is not b.unet
    assert all(p.is_cuda for p in a.unet.parameters())
    image = a("a cat", num_inference_steps=2, height=16, width=16, output_type="np",
              generator=torch.Generator("cuda").manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)


def test_cuda_registry_unload_returns_device_memory(tmp_path, bert_family):
    """Per-blob device storages: unloading a model gives its unique bytes back to the
    allocator (``memory_allocated``), and a resident base is not placed twice."""
    import gc

    bundle = pack(tmp_path, {"base": bert_family["base"], "finetune": bert_family["finetune"],
                             "frozen": bert_family["frozen"]})
    reg = tdedup.Registry(device="cuda")
    reg.load(bundle, ["base", "frozen"])
    before = torch.cuda.memory_allocated()
    added = reg.place(bundle, ["finetune"]).stats.device_bytes
    assert added == reg.stats.models["finetune"].unique_bytes > 0
    assert torch.cuda.memory_allocated() - before >= added
    assert reg.place(bundle, ["base"]).stats.device_bytes == 0  # resident: nothing placed
    assert reg.unload("finetune") == added
    gc.collect()
    assert torch.cuda.memory_allocated() == before
    assert_matches_safetensors(reg["frozen"], bert_family["frozen"] / "model.safetensors")


def test_cuda_builders_copy_a_cpu_source_once(tmp_path, bert_family):
    """A source loaded on the CPU, device="cuda": every builder's model is on the device
    (sentence_transformer and pipelines returned CPU models), each distinct tensor copied
    once per source and shared by the models that share it on the host."""
    pytest.importorskip("diffusers")
    pytest.importorskip("sentence_transformers")
    from test_load_integrations import _tiny_sd_pair, _tiny_sentence_transformer

    (tmp_path / "bert").mkdir()
    st = _tiny_sentence_transformer(tmp_path, bert_family["base"])
    loaded = tdedup.load(pack(tmp_path / "bert", {"base": bert_family["base"],
                                                  "frozen": bert_family["frozen"],
                                                  "st": st}), device="cpu")
    a = tdedup.from_bundle(loaded, "base", device="cuda")
    b = tdedup.from_bundle(loaded, "frozen", device="cuda")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(p.is_cuda for p in [*pa.values(), *pb.values()])
    shared = [k for k in pa if loaded["base"][k].data_ptr() == loaded["frozen"][k].data_ptr()]
    assert shared and all(pa[k].data_ptr() == pb[k].data_ptr() for k in shared)
    model = tdedup.sentence_transformer(loaded, "st", device="cuda")
    assert model.device.type == "cuda" and all(p.is_cuda for p in model.parameters())

    (tmp_path / "sd").mkdir()
    sources = _tiny_sd_pair(tmp_path / "sd")
    host = tdedup.load(pack(tmp_path / "sd", sources), device="cpu")
    pipes = tdedup.pipelines(host, list(sources), device="cuda")
    first, second = pipes["sd-a"], pipes["sd-b"]
    assert first.text_encoder is second.text_encoder and first.vae is second.vae
    assert all(p.is_cuda for p in [*first.unet.parameters(), *first.vae.parameters(),
                                    *first.text_encoder.parameters()])
