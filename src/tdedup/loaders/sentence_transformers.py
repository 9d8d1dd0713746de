"""Rebuild a sentence-transformers model from a bundled sentence-transformers folder.

    model = tdedup.sentence_transformer("family.tdd", "base")   # or a loaded bundle
    model.encode(["a sentence"])      # the same embeddings as SentenceTransformer(folder)

The folder's ``modules.json`` is followed module by module: the ``Transformer`` module's
model is :func:`tdedup.from_bundle`'s (its tensors shared with every other model of the
bundle), the others (pooling, normalization, dense layers without weights in the bundle)
are loaded by their own ``load`` from the small files the bundle holds. The
``config_sentence_transformers.json`` settings (prompts, similarity function) are kept.
sentence-transformers is imported only when called (the ``sentence-transformers`` extra).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoadError
from .provider import as_provider, extract_files, provider_path, target_device
from .deps import require_torch
from .transformers import from_bundle

if TYPE_CHECKING:
    import os

    import torch

    from .provider import ModelProvider

#: ``config_sentence_transformers.json`` keys passed on to ``SentenceTransformer``.
MODEL_SETTINGS = ("prompts", "default_prompt_name", "similarity_fn_name")


def _sentence_transformers():
    try:
        return importlib.import_module("sentence_transformers")
    except ImportError:
        raise LoadError("rebuilding a sentence-transformers model needs "
                        "sentence-transformers, which is not installed",
                        hint="pip install 'tdedup[sentence-transformers]'") from None


def _module_class(ref: str):
    """The class a ``modules.json`` ``type`` names (``sentence_transformers.models.Pooling``)."""
    module_name, _, class_name = ref.rpartition(".")
    try:
        with warnings.catch_warnings():  # sentence_transformers.models: an old, kept path
            warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise LoadError(f"cannot import the sentence-transformers module {ref!r}") from None


def _bundle_transformer(base, source, name: str, folder: str, dtype, device):
    """A subclass of ``base`` (sentence-transformers' ``Transformer``) whose model comes
    from the bundle instead of ``from_pretrained`` on a folder of weights."""
    tf = importlib.import_module("transformers")
    from transformers import PretrainedConfig

    tasks = getattr(sys.modules[base.__module__], "TRANSFORMER_TASK_TO_AUTO_MODEL", {})

    def _load_model(self, *args, **kwargs):
        values = [*args, *kwargs.values()]
        config = next((v for v in values if isinstance(v, PretrainedConfig)), None)
        task = next((v for v in values if isinstance(v, str) and v in tasks),
                    "feature-extraction")
        return from_bundle(source, name, cls=tasks.get(task, tf.AutoModel), config=config,
                           folder=folder, dtype=dtype, device=device)

    return type(base.__name__, (base,), {"_load_model": _load_model,
                                         "__module__": base.__module__})


def _load_module(cls, root: Path, folder: str):
    """One module by its own ``load``: the current signature (a model folder and a
    subfolder) or the old one (a path)."""
    params = inspect.signature(cls.load).parameters
    if len(params) == 1:
        return cls.load(str(root / folder))
    return cls.load(str(root), subfolder=folder, local_files_only=True)


def sentence_transformer(bundle_or_loaded: "ModelProvider | str | os.PathLike", name: str, *,
                         device: "str | torch.device" = "auto",
                         dtype: "torch.dtype | None" = None) -> "torch.nn.Module":
    """A ``SentenceTransformer`` rebuilt from model ``name`` of a bundle (a bundled
    sentence-transformers folder: ``modules.json``, pooling config...), its transformer's
    weights the bundle's shared tensors (``requires_grad=False``).

    ``bundle_or_loaded``: a bundle path (``name`` is loaded on ``device``) or a model
    provider (:mod:`tdedup.loaders.provider`). ``device``, ``dtype``: as
    :func:`tdedup.from_bundle`'s (with a loaded source, ``"auto"`` keeps the tensors where
    they are, another device copies them there once per source).
    """
    require_torch()
    st = _sentence_transformers()  # before the provider: a missing extra fails first
    where = target_device(device)
    source = as_provider(bundle_or_loaded, [name], device)
    if "modules.json" not in source.files(name):
        raise LoadError(f"model {name!r} is not a sentence-transformers folder (no modules.json)",
                        path=provider_path(source))
    transformer_base = _module_class("sentence_transformers.models.Transformer")
    modules = []
    with tempfile.TemporaryDirectory(prefix="tdedup-") as tmp:
        root = extract_files(source, name, Path(tmp))
        settings_file = root / "config_sentence_transformers.json"
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        for entry in json.loads((root / "modules.json").read_text()):
            cls = _module_class(entry["type"])
            folder = entry.get("path", "")
            if isinstance(cls, type) and issubclass(cls, transformer_base):
                module = _load_module(
                    _bundle_transformer(cls, source, name, folder, dtype, where), root, folder)
                module.__class__ = cls  # a plain Transformer from here on
            else:
                module = _load_module(cls, root, folder)
            modules.append(module)
    if where is None:  # "auto": where the bundle's tensors are
        params = [p for m in modules for p in m.parameters()]
        where = params[0].device if params else "cpu"
    kwargs = {k: settings[k] for k in MODEL_SETTINGS if settings.get(k) is not None}
    return st.SentenceTransformer(modules=modules, device=str(where), **kwargs).eval()


__all__ = ["sentence_transformer"]
