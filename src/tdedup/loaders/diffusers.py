"""Rebuild Diffusers pipelines from a bundle, components sharing loaded tensors.

    pipes = tdedup.pipelines("pipelines.tdd", ["sd-a", "sd-b"])
    pipes["sd-a"].text_encoder is pipes["sd-b"].text_encoder    # True when identical

Each component with weights in the bundle (a Diffusers model, or a transformers model
such as a text encoder) is built from its config with parameters on the meta device and
given the loaded tensors (:func:`tdedup.loaders.modules.load_into`); the other components
(schedulers, tokenizers, feature extractors) are made by their own ``from_pretrained``
from the small files the bundle holds. diffusers is imported only when called.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoadError
from .modules import empty_init, load_into
from .provider import (
    WEIGHT_SUFFIXES,
    as_provider,
    component_state,
    extract_files,
    provider_path,
    target_device,
)
from .deps import require, require_torch
from .transformers import build_empty, convert_state

if TYPE_CHECKING:
    import os

    import torch

    from .provider import ModelProvider


def _diffusers():
    return require("diffusers", "rebuilding a Diffusers pipeline")


def component_class(library: str, class_name: str):
    """The class a ``model_index.json`` entry ``[library, class_name]`` names."""
    diffusers = _diffusers()
    for module_name in (library, f"diffusers.pipelines.{library}"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, class_name):
            return getattr(module, class_name)
    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name)
    raise LoadError(f"cannot find class {class_name!r} of library {library!r}")


def _component_key(cls, source, model: str, folder: str, state: dict) -> tuple:
    """What makes two components the same module: class, config files, and tensors
    (the same storage, dtype, shape and strides for every key)."""
    files = []
    for path in sorted(source.files(model)):
        if path.startswith(folder + "/") and not path.endswith(WEIGHT_SUFFIXES):
            files.append((path[len(folder) + 1:],
                          hashlib.sha256(source.read_file(model, path)).hexdigest()))
    tensors = tuple(sorted((k, t.data_ptr(), str(t.dtype), tuple(t.shape), tuple(t.stride()),
                            str(t.device)) for k, t in state.items()))
    return (cls, tuple(files), tensors)


def _build_component(cls, source, model: str, folder: str, directory: Path,
                     variant: str | None, built: dict, device):
    state = component_state(source, model, folder, variant)
    if not state:  # scheduler, tokenizer, feature extractor: small files only
        return cls.from_pretrained(directory)
    state = convert_state(source, model, state, None, device)
    key = _component_key(cls, source, model, folder, state)
    if key in built:  # the same component in another pipeline: the same module object
        return built[key]
    if hasattr(cls, "config_class") and hasattr(cls, "_from_config"):  # transformers model
        module = build_empty(cls, cls.config_class.from_pretrained(directory))
    elif hasattr(cls, "load_config") and hasattr(cls, "from_config"):  # diffusers model
        with empty_init():
            module = cls.from_config(cls.load_config(directory))
    else:
        raise LoadError(f"component {folder!r} of model {model!r}: do not know how to build "
                        f"{cls.__name__} from its config", path=provider_path(source))
    load_into(module, {model: state}, model, strict=False)
    built[key] = module.eval()
    return built[key]


def pipelines(bundle_or_loaded: "ModelProvider | str | os.PathLike", names: Sequence[str], *,
              variant: str | None = None, device: "str | torch.device" = "auto",
              pipeline_class: "type | None" = None) -> dict[str, Any]:
    """One Diffusers pipeline per model of ``names`` (pipeline folders packed whole),
    keyed by name. Components with weights that are identical across the pipelines
    (same class, config files and tensors: a shared text encoder or VAE) are the *same
    module object*, as a server of several pipelines over one backbone needs; the
    others (UNets of fine-tunes) still share every identical tensor. A shared component
    is shared for good: moving it (``pipe.to(...)``) or patching it affects every
    pipeline that holds it.

    ``bundle_or_loaded``: a bundle path (``names`` loaded on ``device``) or a model
    provider (:mod:`tdedup.loaders.provider`); with a provider, ``device="auto"`` keeps
    its tensors where they are and another device copies them there, once per source
    (as :func:`tdedup.from_bundle` does). ``pipeline_class``: default, the
    ``_class_name`` of each ``model_index.json``. ``variant``: weight files of a variant
    (``"fp16"`` for ``*.fp16.safetensors``). Parameters have ``requires_grad=False``.
    """
    require_torch()
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    where = target_device(device)
    source = as_provider(bundle_or_loaded, names, device)
    built: dict = {}
    return {n: _pipeline(source, n, pipeline_class, variant, built, where) for n in names}


def pipeline_from_bundle(bundle_or_loaded: "ModelProvider | str | os.PathLike", model: str, *,
                         pipeline_class: "type | None" = None, variant: str | None = None,
                         device: "str | torch.device" = "auto") -> Any:
    """The Diffusers pipeline of one model: ``pipelines(..., [model])[model]``."""
    return pipelines(bundle_or_loaded, [model], variant=variant, device=device,
                     pipeline_class=pipeline_class)[model]


def _pipeline(source, model: str, pipeline_class, variant: str | None, built: dict,
              device):
    diffusers = _diffusers()
    if "model_index.json" not in source.files(model):
        raise LoadError(f"model {model!r} is not a Diffusers pipeline (no model_index.json)",
                        path=provider_path(source))
    index = json.loads(source.read_file(model, "model_index.json"))
    if pipeline_class is None:
        pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
        if pipeline_class is None:
            raise LoadError(f"diffusers has no pipeline class {index.get('_class_name')!r}",
                            path=provider_path(source))
    accepted = inspect.signature(pipeline_class.__init__).parameters
    components = {}
    with tempfile.TemporaryDirectory(prefix="tdedup-") as tmp:
        root = extract_files(source, model, Path(tmp))
        for name, spec in index.items():
            if name.startswith("_"):
                continue
            if not (isinstance(spec, list) and len(spec) == 2):
                if name in accepted:  # a pipeline option, e.g. requires_safety_checker
                    components[name] = spec
                continue
            library, class_name = spec
            if library is None or class_name is None:
                components[name] = None
                continue
            cls = component_class(library, class_name)
            components[name] = _build_component(cls, source, model, name, root / name,
                                                variant, built, device)
    return pipeline_class(**components)


__all__ = ["pipelines", "pipeline_from_bundle", "component_class"]
