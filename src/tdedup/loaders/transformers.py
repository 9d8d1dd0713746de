"""Rebuild transformers models from a bundle: the config stored in it, the shared weights.

    loaded = tdedup.load("family.tdd", device="cuda")
    base = from_bundle(loaded, "base")          # a BertModel whose tensors are loaded's
    tuned = from_bundle(loaded, "ft-freeze")    # shares every unchanged tensor with base

The model is built with its parameters on the meta device (no memory), then the loaded
tensors are assigned to it (:func:`tdedup.loaders.modules.load_into`), so models of one
family share storage for every tensor they have in common. transformers is imported only
when these functions are called.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

from ..errors import LoadError
from .modules import empty_init, load_into, meta_tensors, move_buffers
from .torch import LoadedBundle, load, require, require_torch


def _transformers():
    return require("transformers", "rebuilding a transformers model")


def extract_files(loaded: LoadedBundle, model: str, dest: Path, folder: str = "") -> Path:
    """Write ``model``'s non-weight files below ``folder`` (configs, tokenizer files)
    into ``dest``, keeping their relative paths; returns ``dest / folder``."""
    weights = {ti.file for ti in loaded.info(model).values()}
    prefix = f"{folder}/" if folder else ""
    for path in loaded.files(model):
        if path in weights or not path.startswith(prefix) or path.endswith(
                (".safetensors", ".gguf")):
            continue
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(loaded.read_file(model, path))
    return dest / folder if folder else dest


def resolve_model_class(config, model_class=None):
    """The class to build: ``model_class`` (a class or a transformers class name), else
    the config's first ``architectures`` entry, else ``AutoModel``'s choice."""
    tf = _transformers()
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = arch if arch and hasattr(tf, arch) else tf.AutoModel
    if isinstance(model_class, str):
        if not hasattr(tf, model_class):
            raise LoadError(f"transformers has no class {model_class!r}")
        model_class = getattr(tf, model_class)
    return model_class


def build_empty(cls, config):
    """An instance of ``cls`` for ``config`` with its parameters on the meta device."""
    with empty_init():
        if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):
            return cls.from_config(config)  # an Auto class
        return cls._from_config(config)


def assign_weights(module, loaded: LoadedBundle, model: str, state: dict | None = None):
    """Assign ``model``'s loaded tensors (or ``state``) to a module built by
    :func:`build_empty`; ties weights; moves buffers made on the host to the device;
    refuses to return a module with a tensor left on the meta device."""
    mapping = {model: state} if state is not None else loaded
    load_into(module, mapping, model, strict=False)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    left = meta_tensors(module)
    if left:
        shown = ", ".join(left[:5]) + (f" (+{len(left) - 5} more)" if len(left) > 5 else "")
        raise LoadError(f"model {model!r} lacks tensors the module needs: {shown}",
                        path=loaded.path)
    move_buffers(module, loaded.device)
    return module.eval()


def from_bundle(loaded: LoadedBundle | str | os.PathLike, model: str, *,
                model_class=None, folder: str = "", device=None, **load_kw):
    """A transformers model rebuilt from ``model``'s config.json in the bundle and its
    loaded tensors (shared with every other model loaded from the same bundle).

    ``loaded``: a :class:`LoadedBundle`, or a bundle path to load ``model`` from (then
    ``device`` and ``load_kw`` go to :func:`tdedup.load`). ``folder``: where the config
    and weights lie inside the model (a pipeline component, e.g. ``"text_encoder"``).
    """
    require_torch()
    tf = _transformers()
    if not isinstance(loaded, LoadedBundle):
        loaded = load(loaded, device=device or "auto", models=[model], **load_kw)
    with tempfile.TemporaryDirectory(prefix="tdedup-") as tmp:
        config_dir = extract_files(loaded, model, Path(tmp), folder)
        if not (config_dir / "config.json").is_file():
            where = posixpath.join(folder, "config.json") if folder else "config.json"
            raise LoadError(f"model {model!r} has no {where} in the bundle", path=loaded.path)
        config = tf.AutoConfig.from_pretrained(config_dir)
    module = build_empty(resolve_model_class(config, model_class), config)
    return assign_weights(module, loaded, model, loaded.component(model, folder))
