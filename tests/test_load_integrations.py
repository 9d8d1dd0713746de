"""Models rebuilt from a loaded bundle give the originals' outputs, sharing tensors:
transformers (a tiny BERT family; the corpus MiniLM) and Diffusers pipelines (a tiny DDPM;
two tiny Stable Diffusion pipelines with one text encoder and one VAE).

Weights are checked bit for bit (tests/test_load.py); outputs are compared with
:func:`same_output`, a 1e-5 tolerance: CPU BLAS kernels round differently depending on
where a weight starts modulo 16 bytes (an F32 GEMM gives 4 different results for the 4
alignments), and a tensor's address in the original file differs from its address in
the loaded arena.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tdedup  # noqa: E402
from tdedup.errors import LoadError  # noqa: E402
from tdedup.loaders.transformers import from_bundle  # noqa: E402

from helpers.bundle_helpers import minilm_family  # noqa: E402


def same_output(got, want) -> None:
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), rtol=1e-5,
                               atol=1e-5)


def params(module) -> dict:
    return dict(module.named_parameters())


def pack(tmp: Path, sources: dict[str, Path]) -> Path:
    out = tmp / "b.tdd"
    tdedup.pack([f"{n}={p}" for n, p in sources.items()], out)
    return out


# -- transformers ---------------------------------------------------------------------

def test_bert_family_outputs_and_sharing(tmp_path, bert_family):
    from transformers import BertModel

    loaded = tdedup.load(pack(tmp_path, bert_family), device="cpu")
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    models = {}
    for name, folder in bert_family.items():
        m = from_bundle(loaded, name)
        assert type(m) is BertModel and not m.training
        ref = BertModel.from_pretrained(folder).eval()
        with torch.no_grad():
            same_output(m(input_ids=ids).last_hidden_state,
                        ref(input_ids=ids).last_hidden_state)
        models[name] = m
    base, frozen = params(models["base"]), params(models["frozen"])
    for key, p in base.items():
        assert params(models["sharded"])[key].data_ptr() == p.data_ptr()
        if key.startswith(("embeddings.", "encoder.layer.0.")):
            assert frozen[key].data_ptr() == p.data_ptr(), key
        else:
            assert frozen[key].data_ptr() != p.data_ptr() or key.startswith("pooler."), key
    assert base["embeddings.word_embeddings.weight"].data_ptr() == \
        loaded["base"]["embeddings.word_embeddings.weight"].data_ptr()


def test_from_bundle_path_class_and_errors(tmp_path, bert_family):
    from transformers import BertForMaskedLM

    bundle = pack(tmp_path, {"base": bert_family["base"]})
    m = from_bundle(bundle, "base", device="cpu", cls="BertModel")
    assert type(m).__name__ == "BertModel"
    # A head the checkpoint lacks is refused, not left on the meta device.
    with pytest.raises(LoadError, match="lacks tensors"):
        from_bundle(bundle, "base", device="cpu", cls=BertForMaskedLM)
    with pytest.raises(LoadError, match="no class"):
        from_bundle(bundle, "base", device="cpu", cls="NoSuchModel")


@pytest.fixture(scope="module")
def minilm_loaded(corpus, tmp_path_factory):
    paths = dict(zip(("base", "ft-freeze"), minilm_family(corpus)[0:4:3]))
    return tdedup.load(pack(tmp_path_factory.mktemp("minilm"), paths), device="cpu"), paths


def test_corpus_minilm_outputs(minilm_loaded):
    from transformers import AutoTokenizer, BertModel

    loaded, paths = minilm_loaded
    tok = AutoTokenizer.from_pretrained(paths["base"])
    batch = tok(["Deduplicated tensors load once.", "A second, longer sentence here."],
                padding=True, return_tensors="pt")
    for name, folder in paths.items():
        m = from_bundle(loaded, name)
        ref = BertModel.from_pretrained(folder).eval()
        with torch.no_grad():
            same_output(m(**batch).last_hidden_state, ref(**batch).last_hidden_state)
    a, b = (params(from_bundle(loaded, n)) for n in paths)
    shared = [k for k in a if a[k].data_ptr() == b[k].data_ptr()]
    assert len(shared) == 55  # embeddings, layers 0-2 (frozen) and the pooler (no gradient)
    assert "embeddings.word_embeddings.weight" in shared


# -- diffusers ------------------------------------------------------------------------

def test_ddpm_pipeline(tmp_path, diffusers_pipeline, bert_family):
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline

    from tdedup.loaders.diffusers import pipeline_from_bundle

    loaded = tdedup.load(pack(tmp_path, {"ddpm": diffusers_pipeline,
                                         "bert": bert_family["base"]}), device="cpu")
    pipe = pipeline_from_bundle(loaded, "ddpm")
    ref = DDPMPipeline.from_pretrained(diffusers_pipeline)
    out = [p(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
             output_type="np").images for p in (pipe, ref)]
    same_output(out[0], out[1])
    assert params(pipe.unet)["conv_in.weight"].data_ptr() == \
        loaded["ddpm"]["unet/conv_in.weight"].data_ptr()
    with pytest.raises(LoadError, match="not a Diffusers pipeline"):
        pipeline_from_bundle(loaded, "bert")


def _tiny_sd_pair(root: Path) -> dict[str, Path]:
    """Two tiny Stable Diffusion pipelines saved with ``save_pretrained``: one text encoder,
    tokenizer and VAE, two UNets (other seeds)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({t: i + 2 for i, t in enumerate(letters + [c + "</w>" for c in letters])})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"),
                              model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                        norm_num_groups=4, sample_size=16)
    out = {}
    for name, seed in (("sd-a", 1), ("sd-b", 2)):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), cross_attention_dim=16, attention_head_dim=2,
            norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        out[name] = root / name
        pipe.save_pretrained(out[name])
    return out


def test_stable_diffusion_pipelines_share_text_encoder(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    from tdedup.loaders.diffusers import pipeline_from_bundle

    sources = _tiny_sd_pair(tmp_path)
    loaded = tdedup.load(pack(tmp_path, sources), device="cpu")
    pipes = {n: pipeline_from_bundle(loaded, n) for n in sources}
    a, b = pipes["sd-a"], pipes["sd-b"]
    for component in ("text_encoder", "vae"):
        pa, pb = params(getattr(a, component)), params(getattr(b, component))
        assert pa and all(pa[k].data_ptr() == pb[k].data_ptr() for k in pa), component
    ua, ub = params(a.unet), params(b.unet)
    assert any(ua[k].data_ptr() != ub[k].data_ptr() for k in ua)
    for name, pipe in pipes.items():
        ref = StableDiffusionPipeline.from_pretrained(sources[name])
        run = [p("a cat", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images for p in (pipe, ref)]
        same_output(run[0], run[1])
