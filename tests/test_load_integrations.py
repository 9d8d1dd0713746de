"""Models rebuilt from a loaded bundle give the originals' outputs, sharing tensors:
transformers (a tiny BERT family; the corpus MiniLM in tests/test_models_corpus.py) and
Diffusers pipelines (a tiny DDPM; two tiny Stable Diffusion pipelines with one text
encoder and one VAE); what load_into refuses; errors naming a missing extra.

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
from tdedup.errors import LoadError, ModuleMismatchError, UsageError  # noqa: E402
from tdedup.loaders.transformers import from_bundle  # noqa: E402



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
    with pytest.raises(ModuleMismatchError, match="lacks tensors"):
        from_bundle(bundle, "base", device="cpu", cls=BertForMaskedLM)
    with pytest.raises(LoadError, match="no class"):
        from_bundle(bundle, "base", device="cpu", cls="NoSuchModel")
    # A config the tensors fit under no class: the error says to pass cls=.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(bert_family["base"])
    config.hidden_size, config.intermediate_size = 2 * config.hidden_size, 8
    with pytest.raises(ModuleMismatchError, match="no model class fits") as e:
        from_bundle(bundle, "base", device="cpu", config=config)
    assert "cls=" in e.value.hint


def test_from_bundle_refusals_are_tdedup_errors(tmp_path, bert_family, diffusers_pipeline):
    """A class for another config, something that is no model class, a device that is
    no device or is not there, a folder that holds no transformers config: one
    TdedupError each (they were AttributeError, AssertionError, RuntimeError and
    ValueError from inside torch and transformers)."""
    from transformers import LlamaForCausalLM

    loaded = tdedup.load(pack(tmp_path, {"base": bert_family["base"],
                                         "ddpm": diffusers_pipeline}), device="cpu")
    with pytest.raises(LoadError, match="cannot build LlamaForCausalLM from its "
                                        "BertConfig") as e:
        from_bundle(loaded, "base", cls=LlamaForCausalLM)
    assert "made for a LlamaConfig" in str(e.value) and "cls=" in e.value.hint
    for bad in (int, "BertTokenizer", 3):
        with pytest.raises(LoadError, match="is not a model class"):
            from_bundle(loaded, "base", cls=bad)
    with pytest.raises(UsageError, match="not a torch device: 'gpu'") as e:
        from_bundle(loaded, "base", device="gpu")
    assert "'cuda:N'" in e.value.hint
    if not torch.cuda.is_available():  # as the path form says it
        with pytest.raises(LoadError, match="CUDA is not available"):
            from_bundle(loaded, "base", device="cuda")
    pytest.importorskip("diffusers")
    with pytest.raises(LoadError, match="unet/config.json is not a config transformers "
                                        "can read") as e:
        from_bundle(loaded, "ddpm", folder="unet")
    assert "tdedup.pipelines" in e.value.hint and "tdedup-" not in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("builder", ["from_bundle", "sentence_transformer", "pipelines"])
def test_device_is_honoured_alike_by_every_builder(tmp_path, bert_family, diffusers_pipeline,
                                                  monkeypatch, builder):
    """With a loaded source, ``device=`` other than "auto" moves the tensors there in the
    three builders alike (sentence_transformer and pipelines left them where they were,
    silently); one that is not there is refused by each."""
    pytest.importorskip("diffusers")
    from tdedup.loaders import transformers as lt

    models = {"base": bert_family["base"], "ddpm": diffusers_pipeline}
    if builder == "sentence_transformer":
        pytest.importorskip("sentence_transformers")
        models["st"] = _tiny_sentence_transformer(tmp_path, bert_family["base"])
    loaded = tdedup.load(pack(tmp_path, models), device="cpu")
    call = {"from_bundle": lambda d: from_bundle(loaded, "base", device=d),
            "sentence_transformer": lambda d: tdedup.sentence_transformer(loaded, "st",
                                                                          device=d),
            "pipelines": lambda d: tdedup.pipelines(loaded, ["ddpm"], device=d)}[builder]
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="CUDA is not available"):
            call("cuda")
    with pytest.raises(UsageError, match="not a torch device"):
        call("gpu")
    asked = []
    original = lt.convert_state

    def spy(source, name, state, dtype, device):
        asked.append(device)
        return original(source, name, state, dtype, device)

    monkeypatch.setattr(lt, "convert_state", spy)
    if builder == "pipelines":
        from tdedup.loaders import diffusers as ld

        monkeypatch.setattr(ld, "convert_state", spy)
    model = call("cpu")
    assert asked and all(d == torch.device("cpu") for d in asked)
    if builder == "sentence_transformer":
        from sentence_transformers import SentenceTransformer

        ref = SentenceTransformer(str(models["st"]), device="cpu")
        same_output(model.encode(["w1 w2 w3"]), ref.encode(["w1 w2 w3"]))


def _tiny_sentence_transformer(root: Path, bert: Path) -> Path:
    """A sentence-transformers folder (modules.json, a Transformer over the tiny BERT
    with a word-piece tokenizer, mean pooling) saved by sentence-transformers."""
    import shutil

    from sentence_transformers import SentenceTransformer
    from transformers import BertTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Pooling, Transformer

    source = root / "st-source"
    shutil.copytree(bert, source)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(91)]
    (source / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(source / "vocab.txt")).save_pretrained(source)
    width = json.loads((source / "config.json").read_text())["hidden_size"]
    model = SentenceTransformer(modules=[Transformer(str(source)), Pooling(width)],
                                device="cpu")
    model.save(str(root / "st"))
    return root / "st"


def test_tied_head_loads_and_private_keeps_the_tie(tmp_path):
    """A masked-LM checkpoint (decoder tied to the word embeddings, saved once): the
    config's architecture is built, the tie is restored; private() copies keep it."""
    from transformers import BertForMaskedLM

    from helpers.factory import tiny_bert_config

    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path / "mlm")
    loaded = tdedup.load(pack(tmp_path, {"mlm": tmp_path / "mlm"}), device="cpu")
    m = from_bundle(loaded, "mlm")
    assert type(m) is BertForMaskedLM
    emb = m.bert.embeddings.word_embeddings.weight
    assert m.cls.predictions.decoder.weight is emb and not emb.requires_grad
    ref = BertForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)
    own = tdedup.private(m)
    oemb = own.bert.embeddings.word_embeddings.weight
    assert own.cls.predictions.decoder.weight is oemb and oemb.requires_grad
    assert oemb.data_ptr() != emb.data_ptr() and torch.equal(oemb, emb)


def test_load_into_names_what_stays_on_meta(tmp_path):
    """A module with a computed buffer, built on meta, that has no config to rebuild it
    from and no checkpoint value: load_into refuses it, naming the buffer."""
    from safetensors.torch import save_file

    class Rotary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.register_buffer("freq", torch.arange(4.0), persistent=False)

    (tmp_path / "m").mkdir()
    save_file(Rotary().state_dict(), str(tmp_path / "m" / "model.safetensors"))
    loaded = tdedup.load(pack(tmp_path, {"m": tmp_path / "m"}), device="cpu")
    with torch.device("meta"):
        meta = Rotary()
    with pytest.raises(ModuleMismatchError, match="freq") as e:
        tdedup.load_into(meta, loaded, "m")
    assert e.value.on_meta == ["freq"] and "empty_init" in e.value.hint
    from tdedup.loaders.modules import empty_init

    with empty_init():  # accelerate's include_buffers=False: buffers computed as usual
        ok = Rotary()
    tdedup.load_into(ok, loaded, "m")
    assert torch.equal(ok.freq, torch.arange(4.0)) and not ok.proj.weight.requires_grad


@pytest.mark.parametrize("module, extra, call", [
    ("transformers", "transformers", lambda b: tdedup.from_bundle(b, "base")),
    ("sentence_transformers", "sentence-transformers",
     lambda b: tdedup.sentence_transformer(b, "base")),
    ("diffusers", "diffusers", lambda b: tdedup.pipelines(b, ["base"])),
])
def test_missing_extra_is_named(tmp_path, bert_family, monkeypatch, module, extra, call):
    bundle = pack(tmp_path, {"base": bert_family["base"]})
    monkeypatch.setitem(__import__("sys").modules, module, None)  # import fails
    with pytest.raises(LoadError, match=f"needs {extra.replace('-', '.')}") as e:
        call(bundle)
    assert f"tdedup[{extra}]" in e.value.hint


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

    sources = _tiny_sd_pair(tmp_path)
    pipes = tdedup.pipelines(pack(tmp_path, sources), list(sources), device="cpu")
    a, b = pipes["sd-a"], pipes["sd-b"]
    # Identical components are one module object, not just the same tensors.
    assert a.text_encoder is b.text_encoder and a.vae is b.vae
    assert a.unet is not b.unet and a.scheduler is not b.scheduler
    ua, ub = params(a.unet), params(b.unet)
    assert any(ua[k].data_ptr() != ub[k].data_ptr() for k in ua)
    assert not any(p.requires_grad for p in [*a.unet.parameters(), *a.vae.parameters()])
    for name, pipe in pipes.items():
        ref = StableDiffusionPipeline.from_pretrained(sources[name])
        run = [p("a cat", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images for p in (pipe, ref)]
        same_output(run[0], run[1])
