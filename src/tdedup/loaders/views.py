"""How placed blob bytes become the tensors a checkpoint declared.

A placed blob is a flat uint8 tensor; each tensor that uses it is a typed, shaped view of
it (no copy), so every model using a blob shares its storage. The dtype facts
(``format.checkpoints.dtypes`` holds every one) are applied here: safetensors dtypes and
plain ggml types map to torch dtypes; quantized ggml types stay uint8 blocks (shape: the
logical shape with its last dimension replaced by its byte count), or become float32
through ``gguf.quants`` when dequantized.

State-dict keys are the checkpoint's tensor names, prefixed with the folder of their file
within the model when it is not the model's root (a Diffusers pipeline's
``unet/conv_in.weight``). Names that would still collide (two weight files with the same
tensors in one folder) are the file path, a colon and the name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import BundleFormatError, LoadError
from ..format.bundle.manifest import FileEntry, ModelEntry, TensorEntry
from ..format.bundle.reader import tensor_keys
from ..format.checkpoints.records import shape_overflows
from ..format.checkpoints.dtypes import (
    GgmlBlocks,
    ggml_blocks,
    is_quantized,
    torch_dtype_name,
)
from .deps import torch


def torch_dtype(dtype: str, kind: str) -> Any:
    """The torch dtype a tensor of ``dtype`` loads as, or None for raw bytes (uint8):
    quantized ggml blocks, sub-byte floats, or a dtype this torch lacks."""
    name = torch_dtype_name(dtype, kind)
    return getattr(torch, name, None) if name else None


def quant_of(f: FileEntry, t: TensorEntry) -> GgmlBlocks | None:
    """The block geometry of a quantized GGUF tensor; None for any typed tensor."""
    return ggml_blocks(t.dtype) if is_quantized(t.dtype, f.kind) else None


def state_keys(m: ModelEntry) -> list[tuple[str, FileEntry, TensorEntry]]:
    """State-dict key of each tensor of a model (see the module docstring); the bundle
    reader's :func:`~tdedup.format.bundle.reader.tensor_keys`, so that
    ``Bundle.read_tensor`` takes the keys a load gives."""
    return tensor_keys(m)


def check_fits(t: TensorEntry, f: FileEntry, q, dt) -> None:
    """Refuse a tensor whose dtype and shape do not describe exactly its bytes (a damaged
    or hostile manifest) before a view or an allocation is made from them."""
    shape = tuple(t.shape)
    if shape_overflows(shape):  # torch sizes are int64 (an empty tensor's too)
        ok = False
    elif q is not None:
        block, type_size = q.block, q.type_size
        ok = not shape or (shape[-1] % block == 0 and math.prod(shape[:-1])
                           * (shape[-1] // block * type_size) == t.length)
    else:
        ok = dt is None or math.prod(shape) * dt.itemsize == t.length
    if not ok:
        raise BundleFormatError(f"tensor {t.name!r} of {f.path}: {t.dtype} {list(shape)} does "
                                f"not fit its {t.length} bytes (corrupted manifest)")


def typed_view(raw, f: FileEntry, t: TensorEntry, dev) -> Any:
    """The tensor ``t`` declares, as a view of its placed blob ``raw`` (None: empty)."""
    q = quant_of(f, t)
    dt = None if q is not None else torch_dtype(t.dtype, f.kind)
    check_fits(t, f, q, dt)
    shape = tuple(t.shape)
    if q is not None:
        block, type_size = q.block, q.type_size
        shape = (*shape[:-1], shape[-1] // block * type_size) if shape else (t.length,)
        dt = torch.uint8
    elif dt is None:
        shape, dt = (t.length,), torch.uint8
    if raw is None:  # an empty tensor: no blob bytes to view
        return torch.empty(shape, dtype=dt, device=dev)
    return raw.view(dt).view(shape)


def dequantized(raw, f: FileEntry, t: TensorEntry, dev) -> Any:
    """A quantized GGUF tensor as float32 on ``dev`` (a new tensor, not a view)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    q = quant_of(f, t)
    if q is None:
        raise BundleFormatError(f"tensor {t.name!r} of {f.path}: {t.dtype} is not quantized")
    check_fits(t, f, q, None)
    shape = tuple(t.shape)
    if raw is None:
        return torch.empty(shape, dtype=torch.float32, device=dev)
    try:
        values = dequantize(raw.cpu().numpy(), GGMLQuantizationType(q.type_id)).reshape(shape)
    except NotImplementedError:
        raise LoadError(f"tensor {t.name!r} of {f.path}: gguf-py cannot dequantize "
                        f"{q.name} tensors", hint="load without --dequantize to get its "
                        "raw blocks") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dev)


__all__ = [
    "check_fits",
    "dequantized",
    "quant_of",
    "state_keys",
    "torch_dtype",
    "typed_view",
]
