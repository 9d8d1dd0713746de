"""``tdedup.load``: every model of a bundle on a torch device, each distinct tensor once.

Each distinct blob the requested models need is decoded and placed on the device once
(:mod:`.placement`); every tensor of every model is a view of its blob's bytes, typed and
shaped as the checkpoint declared it (:mod:`.views`), so tensors identical across models
share one storage (the same tensor object where they are declared alike: see
:class:`LoadedBundle`). ``load`` is a private :class:`~tdedup.loaders.registry.Registry`
used once: the long-lived registry and this one-shot path are the same code.

- ``device="auto"`` (the default): CUDA when available, else the CPU.
- ``verify=True`` (the default): every blob read is checked against its stored BLAKE3
  checksum, on every core, before any tensor is handed out; ``verify=False`` skips it.

GGUF tensors of F32/F16/BF16/integer types are typed tensors; quantized ones are uint8
tensors of their raw blocks (shape: the logical shape with the last dimension replaced by
its byte count), or float32 with ``dequantize=True`` (via ``gguf.quants``).
:meth:`LoadedBundle.info` gives each tensor's source dtype (the ggml type) and logical
shape.

State-dict keys are the checkpoint's tensor names, prefixed with the folder of their file
within the model when it is not the model's root (a Diffusers pipeline's
``unet/conv_in.weight``; :meth:`LoadedBundle.component` gives one folder's tensors by
their own names). Names that would still collide (two weight files with the same tensors
in one folder) are the file path, a colon and the name (``q8_0.gguf:blk.0.attn_q.weight``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import TdedupError
from .deps import require, require_torch
from .registry import Registry
from .results import LoadedBundle, LoadStats, TensorInfo, weight_variant
from .views import torch_dtype


def load(path: str | os.PathLike, device: Any = "auto",
         models: Sequence[str] | str | None = None,
         verify: bool = True, *, dequantize: bool = False, workers: int | None = None,
         progress: Callable[[int, int], None] | None = None) -> LoadedBundle:
    """Load the tensors of ``models`` of a bundle onto ``device``, each distinct tensor
    once. See the module docstring for what comes back.

    ``models``: None (the default) for every model; one name, or a sequence of names;
    an empty sequence loads none (an empty :class:`LoadedBundle`).

    ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cuda"`` (``"cuda:N"``) or
    ``"cpu"``. ``verify``: check every blob read against its stored checksum before any
    tensor is handed out. ``dequantize``: quantized GGUF tensors as float32. ``workers``:
    decoding threads (default: every core, up to 8). ``progress(done, total)``: stored
    bytes placed so far, as blobs finish.
    """
    require_torch()
    registry = Registry(device, verify=verify, workers=workers)
    return registry.place(path, models, dequantize=dequantize, progress=progress)


__all__ = ["load", "LoadedBundle", "LoadStats", "TensorInfo", "torch_dtype", "TdedupError",
           "Registry", "require", "require_torch", "weight_variant"]
