"""Rebuild Diffusers pipelines from a bundle, components sharing loaded tensors.

    loaded = tdedup.load("pipelines.tdd", device="cuda")
    a = pipeline_from_bundle(loaded, "sd-a")
    b = pipeline_from_bundle(loaded, "sd-b")   # same text encoder: the same tensors as a's

Each component with weights in the bundle (a Diffusers model, or a transformers model
such as a text encoder) is built from its config with parameters on the meta device and
given the loaded tensors (:func:`tdedup.loaders.modules.load_into`); the other components
(schedulers, tokenizers, feature extractors) are made by their own ``from_pretrained``
from the small files the bundle holds. diffusers is imported only when called.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import tempfile
from pathlib import Path

from ..errors import LoadError
from .modules import empty_init
from .torch import LoadedBundle, load, require, require_torch
from .transformers import assign_weights, build_empty, extract_files


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


def _build_component(cls, loaded: LoadedBundle, model: str, folder: str, directory: Path,
                     variant: str | None):
    state = loaded.component(model, folder, variant=variant)
    if not state:  # scheduler, tokenizer, feature extractor: small files only
        return cls.from_pretrained(directory)
    if hasattr(cls, "config_class") and hasattr(cls, "_from_config"):  # transformers model
        module = build_empty(cls, cls.config_class.from_pretrained(directory))
    elif hasattr(cls, "load_config") and hasattr(cls, "from_config"):  # diffusers model
        with empty_init():
            module = cls.from_config(cls.load_config(directory))
    else:
        raise LoadError(f"component {folder!r} of model {model!r}: do not know how to build "
                        f"{cls.__name__} from its config")
    return assign_weights(module, loaded, model, state)


def pipeline_from_bundle(loaded: LoadedBundle | str | os.PathLike, model: str, *,
                         pipeline_class=None, variant: str | None = None, device=None,
                         **load_kw):
    """A Diffusers pipeline rebuilt from ``model`` (a pipeline folder packed whole).

    ``loaded``: a :class:`LoadedBundle`, or a bundle path to load ``model`` from (then
    ``device`` and ``load_kw`` go to :func:`tdedup.load`). ``pipeline_class``: default,
    the ``_class_name`` of ``model_index.json``. ``variant``: weight files of a variant
    (``"fp16"`` for ``*.fp16.safetensors``).
    """
    require_torch()
    diffusers = _diffusers()
    if not isinstance(loaded, LoadedBundle):
        loaded = load(loaded, device=device or "auto", models=[model], **load_kw)
    if "model_index.json" not in loaded.files(model):
        raise LoadError(f"model {model!r} is not a Diffusers pipeline (no model_index.json)",
                        path=loaded.path)
    index = json.loads(loaded.read_file(model, "model_index.json"))
    if pipeline_class is None:
        pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
        if pipeline_class is None:
            raise LoadError(f"diffusers has no pipeline class {index.get('_class_name')!r}")
    accepted = inspect.signature(pipeline_class.__init__).parameters
    components = {}
    with tempfile.TemporaryDirectory(prefix="tdedup-") as tmp:
        root = extract_files(loaded, model, Path(tmp))
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
            components[name] = _build_component(cls, loaded, model, name, root / name,
                                                variant)
    return pipeline_class(**components)
