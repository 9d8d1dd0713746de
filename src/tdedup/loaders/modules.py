"""Module surgery: build modules without memory and give them a bundle's loaded tensors.

:func:`empty_init` builds a module with its parameters on the meta device,
:func:`load_into` assigns loaded tensors to it (so that modules loaded from one
:class:`~tdedup.loaders.torch.LoadedBundle` share storage), :func:`meta_tensors` and
:func:`move_buffers` finish it.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

from ..errors import LoadError
from .torch import LoadedBundle, require_torch

try:
    import torch
except ImportError:  # pragma: no cover - exercised only without the extra
    torch = None


@contextmanager
def empty_init(device="meta"):
    """Build modules with their parameters on ``device`` (default: meta, no memory) while
    buffers are made as usual, so that non-persistent buffers (position ids, rotary
    frequencies) keep their computed values. Load the weights with :func:`load_into`."""
    require_torch()
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device != torch.device(device):
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to(device), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _adapt_prefix(module, state: dict) -> dict:
    """Match a checkpoint saved with (or without) the module's base-model prefix
    (``bert.encoder...`` vs ``encoder...``), as transformers does."""
    prefix = getattr(module, "base_model_prefix", "") or ""
    if not prefix or not state:
        return state
    own = set(module.state_dict(keep_vars=True))
    if sum(k in own for k in state) * 2 >= len(state):
        return state
    dotted = prefix + "."
    stripped = {k[len(dotted):] if k.startswith(dotted) else k: v for k, v in state.items()}
    if sum(k in own for k in stripped) > sum(k in own for k in state):
        return stripped
    added = {dotted + k: v for k, v in state.items()}
    if sum(k in own for k in added) > sum(k in own for k in state):
        return added
    return state


def load_into(module: "torch.nn.Module", loaded: LoadedBundle | Mapping, name: str, *,
              strict: bool = True, prefix: str = "") -> tuple[list[str], list[str]]:
    """Load model ``name``'s tensors into ``module`` with ``assign=True``: its parameters
    and buffers *become* the loaded tensors, so a module built on the meta device (see
    :func:`empty_init`) takes no memory of its own and shares storage with every other
    module loaded from the same :class:`LoadedBundle`.

    ``prefix``: load only the keys under it (stripped), e.g. one component of a model.
    Returns torch's ``(missing_keys, unexpected_keys)``. With ``strict``, missing or
    unexpected keys raise :class:`LoadError`.
    """
    require_torch()
    state = loaded[name]
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = _adapt_prefix(module, state)
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise LoadError(f"model {name!r} does not fit the module: {e}") from None
    if strict and (result.missing_keys or result.unexpected_keys):
        parts = []
        if result.missing_keys:
            parts.append(f"missing {_few(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {_few(result.unexpected_keys)}")
        raise LoadError(f"model {name!r} does not fit {type(module).__name__}: "
                        + "; ".join(parts))
    return result


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def meta_tensors(module) -> list[str]:
    """Names of the parameters and buffers of ``module`` still on the meta device."""
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()]
            if t.is_meta]


def move_buffers(module, device) -> None:
    """Move buffers made on the host (by :func:`empty_init`) to ``device``; parameters
    are left where they are (loaded tensors are already in place)."""
    for sub in module.modules():
        for key, buf in sub._buffers.items():
            if buf is not None and not buf.is_meta and buf.device != device:
                sub._buffers[key] = buf.to(device)


__all__ = ["empty_init", "load_into", "meta_tensors", "move_buffers"]
