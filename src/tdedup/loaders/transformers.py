"""Rebuild transformers models from a bundle: the config stored in it, the shared weights.

    loaded = tdedup.load("family.tdd", device="cuda")
    base = tdedup.from_bundle(loaded, "base")        # e.g. a BertModel viewing loaded's tensors
    tuned = tdedup.from_bundle(loaded, "ft")          # shares every unchanged tensor with base

The model is built with its parameters on the meta device (no memory), then the loaded
tensors are assigned to it (:func:`tdedup.loaders.modules.load_into`), so models of one
family share storage for every tensor they have in common. Parameters come back with
``requires_grad=False``; :func:`tdedup.private` gives a copy to train. transformers is
imported only when these functions are called (the ``transformers`` extra).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoadError, ModuleMismatchError
from .modules import empty_init, load_into
from .provider import (
    as_provider,
    component_state,
    extract_files,
    has_file,
    join,
    provider_path,
    target_device,
)
from .deps import require, require_torch

if TYPE_CHECKING:
    from .provider import ModelProvider

try:
    import torch
except ImportError:  # pragma: no cover - exercised only without the extra
    torch = None


def _transformers():
    return require("transformers", "rebuilding a transformers model")


def resolve_class(cls):
    """``cls`` itself, or the transformers class of that name; it must be a model class
    (a ``torch.nn.Module``, or an Auto model class such as ``AutoModel``)."""
    tf = _transformers()
    hint = "cls= takes a model class or the name of one, e.g. cls='BertModel'"
    if isinstance(cls, str):
        if not hasattr(tf, cls):
            raise LoadError(f"transformers has no class {cls!r}", hint=hint)
        cls = getattr(tf, cls)
    if not isinstance(cls, type) or not (issubclass(cls, torch.nn.Module)
                                         or hasattr(cls, "_model_mapping")):
        what = cls.__name__ if isinstance(cls, type) else repr(cls)
        raise LoadError(f"{what} is not a model class (cls= wants a torch.nn.Module "
                        "such as BertModel, or an Auto class such as AutoModel)", hint=hint)
    return cls


def candidate_classes(config) -> list:
    """Classes to try, in order: the config's architecture (when transformers has it),
    then ``AutoModel`` (the base model, as ``AutoModel.from_pretrained`` builds)."""
    tf = _transformers()
    out = []
    for arch in getattr(config, "architectures", None) or []:
        if hasattr(tf, arch):
            out.append(getattr(tf, arch))
            break
    out.append(tf.AutoModel)
    return out


def build_empty(cls, config):
    """An instance of ``cls`` for ``config`` with its parameters on the meta device."""
    with empty_init():
        if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):
            return cls.from_config(config)  # an Auto class
        return cls._from_config(config)


def load_config(source, name: str, folder: str = "", config=None):
    """``config`` (a config object, or a folder or config.json path), else the model's
    config.json from the source; one :class:`LoadError` if transformers cannot read it."""
    tf = _transformers()
    if config is not None and not isinstance(config, (str, os.PathLike)):
        return config
    if config is not None:
        return _read_config(tf, Path(config), name, str(config), source)
    where = join(folder, "config.json")
    if not has_file(source, name, where):
        raise LoadError(f"model {name!r} has no {where} in the bundle",
                        path=provider_path(source),
                        hint="pass its config: from_bundle(..., config=AutoConfig or "
                             "a folder with config.json)")
    with tempfile.TemporaryDirectory(prefix="tdedup-") as tmp:
        return _read_config(tf, extract_files(source, name, Path(tmp), folder), name,
                            where, source)


def _read_config(tf, folder: Path, name: str, where: str, source):
    try:
        return tf.AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError...
        hint = "pass a transformers config: from_bundle(..., config=...)"
        try:
            raw = json.loads((folder / "config.json" if folder.is_dir() else folder)
                             .read_text())
        except (OSError, ValueError):
            raw = None
        if isinstance(raw, dict) and "_diffusers_version" in raw:
            hint = (f"it is a Diffusers component ({raw.get('_class_name', '?')}): build "
                    "its pipeline with tdedup.pipelines(...)")
        raise LoadError(f"model {name!r}: {where} is not a config transformers can read "
                        f"({_first_line(e).replace(str(folder), where)})",
                        path=provider_path(source), models=(name,),
                        hint=hint) from None


class _Conversions:
    """The converted tensors of one source, keyed by what they are converted from: the
    blob (its hash) and the view of it, when the source says (``info``), else the
    source's tensor object itself. Each lives while a source tensor it was made from
    does: when a registry unloads the models of a blob, their converted copies go too
    (the modules built from them keep what they use)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.items: dict[tuple, tuple[Any, set[int]]] = {}

    def get(self, t, key: tuple, make) -> Any:
        with self.lock:
            item = self.items.get(key)
            if item is None:
                item = (make(), set())
            if id(t) not in item[1]:
                item[1].add(id(t))
                weakref.finalize(t, self._release, key, id(t))
            self.items[key] = item
            return item[0]

    def _release(self, key: tuple, ident: int) -> None:
        with self.lock:
            item = self.items.get(key)
            if item is not None:
                item[1].discard(ident)
                if not item[1]:
                    del self.items[key]


#: id(source) -> (weak reference to it, its conversions), so that models converted
#: alike (``dtype=``, ``device=``) share the converted tensors too.
_CONVERTED: dict[int, tuple] = {}
_CONVERTED_LOCK = threading.Lock()


def _conversions(source) -> _Conversions | None:
    key = id(source)
    with _CONVERTED_LOCK:
        entry = _CONVERTED.get(key)
        if entry is not None and entry[0]() is source:
            return entry[1]
        try:
            ref = weakref.ref(source, lambda _: _CONVERTED.pop(key, None))
        except TypeError:  # a source that takes no weak reference: nothing shared
            return None
        _CONVERTED[key] = (ref, _Conversions())
        return _CONVERTED[key][1]


def _origins(source, name: str) -> dict[int, tuple]:
    """id of each of ``name``'s tensors -> (blob, dequantized), when the source says."""
    info = getattr(source, "info", None)
    if not callable(info):
        return {}
    state = source[name]
    return {id(state[k]): (i.blob, i.dequantized) for k, i in info(name).items()
            if k in state}


def convert_state(source, name: str, state: dict, dtype, device) -> dict:
    """``state`` (tensors of ``source``'s model ``name``) with floating tensors in
    ``dtype`` and every tensor on ``device`` (None: left as they are); each distinct
    tensor is converted once per source, and the converted tensors are shared by every
    model converted alike."""
    if dtype is None and device is None:
        return state
    cache = _conversions(source)
    origins = _origins(source, name) if cache is not None else {}
    out = {}
    for key, t in state.items():
        want = dtype if dtype is not None and t.is_floating_point() else t.dtype
        where = device if device is not None else t.device
        if t.dtype == want and t.device == where:
            out[key] = t
            continue

        def make(t=t, want=want, where=where):
            return t.to(device=where, dtype=want)

        if cache is None:
            out[key] = make()
            continue
        origin = origins.get(id(t), ("object", id(t)))
        ck = (*origin, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(),
              str(t.device), want, str(where))
        out[key] = cache.get(t, ck, make)
    return out


def from_bundle(bundle_or_loaded: "ModelProvider | str | os.PathLike", name: str, *,
                cls: "type | str | None" = None, config: "Any" = None,
                device: "str | torch.device" = "auto", dtype: "torch.dtype | None" = None,
                folder: str = "") -> "torch.nn.Module":
    """A transformers model whose parameters are the bundle's (shared) tensors.

    ``bundle_or_loaded``: a bundle path (``name`` is loaded on ``device``), or a model
    provider (:class:`LoadedBundle`, a registry: see :mod:`tdedup.loaders.provider`).
    ``cls``: the model class (or its name); default: the config's architecture when the
    checkpoint has all its parameters, else ``AutoModel``'s base model (a sentence-
    transformers MPNet says ``MPNetForMaskedLM`` but has no ``lm_head``).
    ``config``: a config object or path, for weights-only models (else config.json).
    ``device``: with a loaded source, ``"auto"`` keeps the tensors where they are; another
    device (``"cpu"``, ``"cuda[:N]"``; one that is not there is refused as the path form
    refuses it) copies them there (once per source). ``dtype``: floating tensors converted
    (once per source, shared by every model converted alike). ``folder``: where the
    config and weights lie inside the model (a pipeline component, ``"text_encoder"``).
    Parameters have ``requires_grad=False``; see :func:`tdedup.private`. Whatever goes
    wrong (a class that cannot be built from the config, a config transformers cannot
    read, a device that is not there) is one :class:`~tdedup.errors.TdedupError`.
    """
    require_torch()
    where = target_device(device)
    source = as_provider(bundle_or_loaded, [name], device)
    cfg = load_config(source, name, folder, config)
    state = component_state(source, name, folder)
    if not state:
        raise LoadError(f"model {name!r} has no weights" + (f" in {folder}/" if folder else ""),
                        path=provider_path(source))
    state = convert_state(source, name, state, dtype, where)
    if dtype is not None:
        setattr(cfg, "dtype" if hasattr(cfg, "dtype") else "torch_dtype", dtype)
    tried = [resolve_class(cls)] if cls is not None else candidate_classes(cfg)
    errors: list[tuple[str, str]] = []  # (class, what went wrong)
    mismatch: ModuleMismatchError | None = None
    for klass in tried:
        try:
            module = build_empty(klass, cfg)
        except Exception as e:  # a class for another config: AttributeError, ValueError...
            made_for = getattr(klass, "config_class", None)
            why = (f"it is made for a {made_for.__name__}" if isinstance(made_for, type)
                   and not isinstance(cfg, made_for) else _first_line(e))
            if cls is not None:
                raise LoadError(f"model {name!r}: cannot build {klass.__name__} from its "
                                f"{type(cfg).__name__} ({why})", path=provider_path(source),
                                models=(name,), hint="pass a class made for its config "
                                "(or leave cls= out to let from_bundle choose)") from None
            errors.append((klass.__name__,
                           f"cannot be built from its {type(cfg).__name__} ({why})"))
            continue
        try:
            # Keys the class has no place for are left out, as from_pretrained does
            # (a base model from a checkpoint with a head); missing ones are refused.
            load_into(module, {name: state}, name, strict=False)
        except ModuleMismatchError as e:
            if cls is not None:
                raise ModuleMismatchError(e.problem, model=e.model, module=e.module,
                                          missing=e.missing, unexpected=e.unexpected,
                                          on_meta=e.on_meta, path=provider_path(source),
                                          hint="pass a class the checkpoint has every "
                                          "parameter of as cls=, or leave cls= out to let "
                                          "from_bundle choose") from None
            errors.append((e.module, f"lacks {_few(e.missing or e.on_meta)}"))
            mismatch = e
            continue
        if errors:  # the config's architecture did not fit: say what was built instead
            warnings.warn(f"model {name!r}: {errors[0][0]} (its config's architecture) "
                          f"{errors[0][1]}; built {type(module).__name__} instead (pass "
                          "cls= to choose)", stacklevel=2)
        return module.eval()
    tell = "; ".join(f"{klass} {what}" for klass, what in errors)
    problem = f"model {name!r}: no model class fits its tensors ({tell})"
    hint = "pass the class the checkpoint was saved from: from_bundle(..., cls=...)"
    if mismatch is None:
        raise LoadError(problem, path=provider_path(source), models=(name,), hint=hint)
    raise ModuleMismatchError(problem, model=name, module=mismatch.module,
                              missing=mismatch.missing, on_meta=mismatch.on_meta,
                              path=provider_path(source), hint=hint)


def _first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its type and the start of its message."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


__all__ = ["from_bundle", "build_empty", "candidate_classes", "convert_state",
           "load_config", "resolve_class"]
