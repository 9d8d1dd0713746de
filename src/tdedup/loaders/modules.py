"""Module surgery: build modules without memory and give them a bundle's loaded tensors.

:func:`empty_init` builds a module with its parameters on the meta device,
:func:`load_into` assigns loaded tensors to it (so that modules loaded from one
:class:`~tdedup.loaders.torch.LoadedBundle` share storage), :func:`meta_tensors` and
:func:`move_buffers` finish it.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

from ..errors import ModuleMismatchError
from .deps import require_torch
from .results import LoadedBundle

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
              strict: bool = True, prefix: str = "", requires_grad: bool = False
              ) -> tuple[list[str], list[str]]:
    """Load model ``name``'s tensors into ``module`` with ``assign=True``: its parameters
    and buffers *become* the loaded tensors, so a module built on the meta device (see
    :func:`empty_init`, or ``with torch.device("meta")``) takes no memory of its own and
    shares storage with every other module loaded from the same :class:`LoadedBundle`.

    Afterwards nothing is left on the meta device: tied weights are re-tied
    (``tie_weights``), non-persistent buffers (position ids, rotary frequencies) take
    the checkpoint's tensor when it has one, else are recomputed by building the module
    (or its nearest ancestor with a ``config``: a transformers or Diffusers model) again
    with parameters on meta; buffers are moved to the loaded tensors' device. A tensor
    still on meta raises :class:`ModuleMismatchError` naming it.

    ``prefix``: load only the keys under it (stripped), e.g. one component of a model.
    ``requires_grad``: of the loaded parameters; False because they are shared with
    every other model of the bundle (see :func:`private` for a copy to train).
    Returns torch's ``(missing_keys, unexpected_keys)``. With ``strict``, missing or
    unexpected keys raise :class:`ModuleMismatchError`.
    """
    require_torch()
    state = loaded[name]
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = _adapt_prefix(module, dict(state))
    persistent = set(module.state_dict(keep_vars=True))
    volatile = {k for k, _ in module.named_buffers() if k not in persistent}
    extra = {k: state.pop(k) for k in list(state) if k in volatile}
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ModuleMismatchError(f"model {name!r} does not fit the module: {e}",
                                  model=name, module=type(module).__name__) from None
    device = next(iter(state.values())).device if state else None
    _fill_buffers(module, extra, device)
    tie = getattr(module, "tie_weights", None)  # transformers: tied weights, re-tied
    if callable(tie):
        tie()
    if device is not None:
        move_buffers(module, device)
    ptrs = {t.data_ptr() for t in state.values() if t.numel()}
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys if k not in params or params[k].is_meta
               or params[k].data_ptr() not in ptrs]
    what = type(module).__name__
    if strict and (missing or result.unexpected_keys):
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {_few(result.unexpected_keys)}")
        raise ModuleMismatchError(f"model {name!r} does not fit {what}: " + "; ".join(parts),
                                  model=name, module=what, missing=missing,
                                  unexpected=result.unexpected_keys)
    left = meta_tensors(module)
    if left:
        lacking_params = any(k in params for k in left)
        raise ModuleMismatchError(
            f"model {name!r} lacks tensors {what} needs (still on the meta device): "
            f"{_few(left)}", model=name, module=what, missing=missing,
            unexpected=result.unexpected_keys, on_meta=left,
            hint="use a module class the checkpoint has every parameter of"
            if lacking_params else "build the module under tdedup's empty_init() (like "
            "accelerate's init_empty_weights(include_buffers=False)): buffers are computed")
    for key in state:
        p = params.get(key)
        if p is not None:
            p.requires_grad_(requires_grad and (p.is_floating_point() or p.is_complex()))
    return result


def _fill_buffers(module, extra: dict, device) -> None:
    """Non-persistent buffers left on the meta device: the checkpoint's tensor when it
    has one of that shape (it is the module's own computed value, saved), else the value
    the module computes when it is built again."""
    rebuilt: dict = {}
    for key, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner, _, leaf = key.rpartition(".")
        sub = module.get_submodule(owner)
        got = extra.get(key)
        if got is not None and tuple(got.shape) == tuple(buf.shape):
            sub.register_buffer(leaf, got.to(buf.dtype), persistent=False)
            continue
        value = _recomputed(module, key, rebuilt)
        if value is not None:
            sub.register_buffer(leaf, value if device is None else value.to(device),
                                persistent=False)


def _recomputed(module, key: str, rebuilt: dict):
    """Buffer ``key`` of ``module`` as computed by building it again (parameters on
    meta) from its ``config``, for the nearest ancestor that has one; None if none."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:depth])
        sub = module.get_submodule(owner)
        if id(sub) not in rebuilt:
            rebuilt[id(sub)] = _rebuild(sub)
        fresh = rebuilt[id(sub)]
        if fresh is not None:
            rest = ".".join(parts[depth:])
            try:
                value = fresh.get_buffer(rest)
            except AttributeError:
                return None
            return None if value is None or value.is_meta else value
    return None


def _rebuild(module):
    """A new instance of a transformers (``_from_config``) or Diffusers (``from_config``)
    model built from ``module.config`` with its parameters on meta; None otherwise."""
    config = getattr(module, "config", None)
    cls = type(module)
    if config is None:
        return None
    with empty_init(), torch.device("cpu"):
        if hasattr(cls, "_from_config"):
            return cls._from_config(config)
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):
            return cls.from_config(config)
    return None


def private(model: "torch.nn.Module") -> "torch.nn.Module":
    """A copy of ``model`` with its own parameters and buffers (for training, or writing
    in place): every tensor is cloned once (tied weights stay tied), floating
    parameters get ``requires_grad=True``. Only the model's own tensors are copied, not
    the bundle arena they view."""
    import copy

    require_torch()
    memo: dict = {}
    for _, t in [*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)]:
        if id(t) in memo:
            continue
        clone = t.detach().clone()
        if isinstance(t, torch.nn.Parameter):
            clone = torch.nn.Parameter(clone, requires_grad=clone.is_floating_point()
                                       or clone.is_complex())
        memo[id(t)] = clone
    return copy.deepcopy(model, memo)


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


__all__ = ["empty_init", "load_into", "meta_tensors", "move_buffers", "private"]
