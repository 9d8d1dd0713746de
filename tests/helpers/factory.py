"""Builders of small, *real* checkpoints for tests: every file is written by the library
that writes such files in the wild (safetensors ``save_file``, ``gguf.GGUFWriter``,
transformers and diffusers ``save_pretrained``), never by hand.

Pure-numpy builders (:func:`make_safetensors`, :func:`make_gguf`, :func:`make_split_gguf`)
take milliseconds. The model families (:func:`make_bert_family`,
:func:`make_diffusers_pipeline`) import torch, transformers or diffusers lazily and take
about a second; ``tests/conftest.py`` builds them once per session. Tests that need them
call ``pytest.importorskip`` first (the conftest fixtures do).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# -- plain files --------------------------------------------------------------------


def random_tensors(seed: int, shapes: Mapping[str, tuple[int, ...]],
                   dtype: str = "float32") -> dict[str, np.ndarray]:
    """Deterministic random tensors by name, in the given dtype."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def make_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` with safetensors' own ``save_file``; returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata=dict(metadata) if metadata else None)
    return path


def _gguf_writer_add(writer, tensors: Mapping[str, np.ndarray], quantize) -> None:
    """Add tensors to a GGUFWriter; names in ``quantize`` are stored quantized."""
    from gguf.quants import quantize as gguf_quantize

    for name, arr in tensors.items():
        qtype = quantize.get(name) if quantize else None
        if qtype is None:
            writer.add_tensor(name, np.ascontiguousarray(arr))
        else:
            data = gguf_quantize(np.asarray(arr, dtype=np.float32), qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def _gguf_writer_finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# A vocabulary with the cases a header parser must get right: empty and NUL-bearing
# tokens, non-ASCII, and tokens longer than 255 bytes (two-byte length fields).
DEFAULT_VOCAB = (["", "\x00", "\x00" * 9, "a", "é", "\u2581the"]
                 + [f"tok{i}" for i in range(300)] + ["x" * 300, "y" * 70_000, "z"])


def make_gguf(path: str | Path, tensors: Mapping[str, np.ndarray], arch: str = "llama",
              quantize: Mapping[str, object] | None = None, *, name: str | None = None,
              vocab: list[str] | None = None, alignment: int | None = None,
              uint16: Mapping[str, int] | None = None) -> Path:
    """Write a GGUF file with ``gguf.GGUFWriter``; returns the path.

    ``quantize`` maps tensor names to a ``gguf.GGMLQuantizationType`` (e.g. ``Q8_0``):
    those tensors are quantized with ``gguf.quants.quantize`` and stored as raw blocks.
    ``vocab`` adds a ``tokenizer.ggml.tokens`` string array (``DEFAULT_VOCAB`` exercises
    the header parser's string skipping); ``uint16``, keys of that type (``split.no``).
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    if name is not None:
        w.add_name(name)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    if vocab is not None:
        w.add_token_list(vocab)
        w.add_token_scores([float(i) for i in range(len(vocab))])
    for key, value in (uint16 or {}).items():
        w.add_uint16(key, value)
    _gguf_writer_add(w, tensors, quantize)
    _gguf_writer_finish(w)
    return path


def make_split_gguf(path: str | Path, tensors: Mapping[str, np.ndarray],
                    max_tensors: int, arch: str = "llama",
                    quantize: Mapping[str, object] | None = None) -> list[Path]:
    """Write a split GGUF (``stem-00001-of-0000N.gguf``...) with GGUFWriter's own
    splitting; ``path`` is the unsplit name. Returns the parts in order."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch, split_max_tensors=max_tensors)
    _gguf_writer_add(w, tensors, quantize)
    _gguf_writer_finish(w)
    parts = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    assert len(parts) > 1, parts
    return parts


# -- transformers family ------------------------------------------------------------

FROZEN_PREFIXES = ("embeddings.", "encoder.layer.0.")


def tiny_bert_config():
    """A BERT small enough to save in milliseconds (~40k parameters)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=32, type_vocab_size=2)


def _fine_tune(model, steps: int, seed: int, frozen: tuple[str, ...] = ()) -> None:
    """A few real AdamW steps on a toy contrastive task (pull two views together).

    Only the last hidden state is used, so the pooler gets no gradient and stays
    byte-identical, as in a real sentence-embedding fine-tune.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        ids = torch.randint(1, model.config.vocab_size, (8, 12), generator=g)
        noisy = ids.clone()
        noisy[:, ::3] = torch.randint(1, model.config.vocab_size, noisy[:, ::3].shape,
                                      generator=g)
        a = model(input_ids=ids).last_hidden_state.mean(1)
        b = model(input_ids=noisy).last_hidden_state.mean(1)
        logits = torch.nn.functional.normalize(a, dim=-1) @ \
            torch.nn.functional.normalize(b, dim=-1).T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(ids)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_bert_family(root: str | Path) -> dict[str, Path]:
    """A tiny BERT family saved with ``save_pretrained``, as folders under ``root``.

    - ``base``: a "pretrained" model: initialised (seed 0), then 3 AdamW steps, so that
      no two of its tensors are equal (fresh LayerNorms are all ones and zeros); only
      the pooler (no gradient) keeps its initial values;
    - ``finetune``: base after 3 more steps, nothing frozen (only the pooler is shared);
    - ``frozen``: base after 3 more steps with ``FROZEN_PREFIXES`` frozen;
    - ``resaved``: base loaded with ``from_pretrained`` and written again with
      safetensors' ``save_file`` and extra metadata: same tensors, other file bytes;
    - ``sharded``: base saved with a small ``max_shard_size`` (several shards + index).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keeps test logs readable
    root = Path(root)
    torch.manual_seed(0)
    base = BertModel(tiny_bert_config())
    _fine_tune(base, steps=3, seed=0)
    out = {"base": root / "base"}
    base.save_pretrained(out["base"])
    out["sharded"] = root / "sharded"
    base.save_pretrained(out["sharded"], max_shard_size="60KB")
    out["resaved"] = root / "resaved"
    resaved = BertModel.from_pretrained(out["base"])
    resaved.config.save_pretrained(out["resaved"])
    save_file(resaved.state_dict(), str(out["resaved"] / "model.safetensors"),
              metadata={"format": "pt", "resaved_by": "tdedup tests"})
    for name, frozen in (("finetune", ()), ("frozen", FROZEN_PREFIXES)):
        model = BertModel.from_pretrained(out["base"])
        _fine_tune(model, steps=3, seed=1, frozen=frozen)
        out[name] = root / name
        model.save_pretrained(out[name])
    return out


# -- diffusers ----------------------------------------------------------------------


def make_diffusers_pipeline(root: str | Path, seed: int = 0,
                            scheduler_steps: int = 1000) -> Path:
    """A tiny DDPM pipeline (UNet2DModel + DDPMScheduler) saved with ``save_pretrained``:
    ``model_index.json`` and ``unet/``, ``scheduler/`` component folders."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=scheduler_steps))
    root = Path(root)
    pipe.save_pretrained(root)
    return root


def shard_index(folder: str | Path) -> dict:
    """The ``weight_map`` of a sharded folder's ``*.safetensors.index.json``."""
    (index,) = Path(folder).glob("*.safetensors.index.json")
    return json.loads(index.read_text())["weight_map"]
