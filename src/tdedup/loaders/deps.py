"""Optional dependencies of the loaders: torch, transformers, diffusers, gguf.

tdedup installs without them; each loader asks for what it needs here, so that a missing
one is one :class:`LoadError` naming the extra to install, never an ``ImportError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..errors import LoadError

torch: Any
try:
    import torch
except ImportError:  # pragma: no cover - exercised only without the extra
    torch = None


def require_torch() -> ModuleType:
    """The ``torch`` module, or :class:`LoadError` saying how to get it."""
    if torch is None:
        raise LoadError("loading a bundle needs PyTorch, which is not installed",
                        hint="pip install 'tdedup[torch]' (or the CPU wheel: "
                             "pip install torch --index-url https://download.pytorch.org/whl/cpu)")
    return torch


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise :class:`LoadError` naming its extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoadError(f"{purpose} needs {module}, which is not installed",
                        hint=f"pip install 'tdedup[{module}]'") from None


__all__ = ["require", "require_torch", "torch"]
