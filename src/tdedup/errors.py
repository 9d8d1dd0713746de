"""The one exception hierarchy of tdedup.

Every error tdedup raises on purpose derives from :class:`TdedupError`. Library code
raises these with the offending path and the problem; only the CLI boundary turns them
into a one-line message and exit code 2 (``TDEDUP_DEBUG=1`` shows the traceback).

Messages read ``<path>: <problem>`` so that a user sees at once which file is at fault.
"""

from __future__ import annotations

import os
from pathlib import Path


class TdedupError(Exception):
    """Base class of every error tdedup raises on purpose.

    Structured fields, so that code adding context never parses a message:

    - ``path``: the file (checkpoint, bundle, output) the problem is about;
    - ``blob``: the bundle blob at fault (its hash), with ``models``, the models using it;
    - ``part``: where inside the thing at fault (``plane 3``, ``factors``, a tensor name);
    - ``hint``: what the user can do about it.

    A lower layer raises with what it knows (a codec knows the ``part``); a higher one
    adds the rest with :meth:`locate` and re-raises the same object.
    """

    def __init__(self, problem: str, *, path: str | os.PathLike | None = None,
                 blob: str | None = None, models: tuple[str, ...] = (),
                 part: str | None = None, hint: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.blob = blob
        self.models = tuple(models)
        self.part = part
        self.hint = hint
        super().__init__(problem)

    def locate(self, *, path: str | os.PathLike | None = None, blob: str | None = None,
               models: tuple[str, ...] | None = None) -> "TdedupError":
        """Fill in context the raiser did not know (fields already set are kept)."""
        if self.path is None and path is not None:
            self.path = str(path)
        if self.blob is None and blob is not None:
            self.blob = blob
        if not self.models and models:
            self.models = tuple(models)
        return self

    @property
    def message(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.blob:
            used = f" (used by {', '.join(self.models)})" if self.models else ""
            where.append(f"blob {self.blob[:16]}{used}")
        if self.part:
            where.append(self.part)
        return ": ".join([*where, self.problem])

    def __str__(self) -> str:
        return self.message


# -- inputs -------------------------------------------------------------------------

class InputError(TdedupError):
    """A path given to tdedup is missing, unreadable or not a model."""


class UnsupportedFormatError(InputError):
    """A file is neither safetensors nor GGUF (nor a folder holding such files)."""


class CheckpointFormatError(InputError):
    """A safetensors or GGUF file is malformed: truncated, bad header, bad offsets."""


class UsageError(TdedupError):
    """The arguments do not make sense together (duplicate model names, bad option)."""


class AmbiguousNameError(UsageError):
    """A name matches several things (a tensor name found in several files of one model);
    ``candidates`` holds the qualified names that pick one each."""

    def __init__(self, problem: str, *, candidates: tuple[str, ...] = (), **kw) -> None:
        super().__init__(problem, **kw)
        self.candidates = tuple(candidates)


# -- bundles ------------------------------------------------------------------------

class BundleError(TdedupError):
    """Base class of problems with a ``.tdd`` bundle."""


class BundleFormatError(BundleError):
    """The bundle's structure is malformed: bad magic, footer, manifest or offsets."""


class UnsupportedVersionError(BundleFormatError):
    """The bundle was written by a newer, incompatible format version."""


class IntegrityError(BundleError):
    """Stored bytes do not match their checksum or hash: the bundle is corrupted."""


class DecompressionBombError(IntegrityError):
    """A blob decodes to more bytes than its declared size."""


class UnsafePathError(BundleError):
    """A model name or file path in a bundle would escape the output folder."""


class ModelNotFoundError(BundleError):
    """A requested model is not in the bundle."""


class ModelNotLoadedError(ModelNotFoundError, KeyError):
    """A model asked of what ``load`` or a ``Registry`` holds is not there. A ``KeyError``
    too, since those are mappings of model names; a ``TdedupError``, so that one
    ``except`` covers a name missing from a bundle path and from a loaded set alike."""


# -- outputs ------------------------------------------------------------------------

class OutputError(TdedupError):
    """Writing an output failed (exists already, disk full, permission denied)."""


class OutputExistsError(OutputError):
    """The output exists and ``--force`` was not given."""


# -- loading ------------------------------------------------------------------------

class LoadError(TdedupError):
    """Loading a bundle onto a torch device failed (missing extra, bad module)."""


class BundleChangedError(LoadError):
    """A loaded model's bundle file was replaced or rewritten since the model was loaded,
    and no longer holds the file asked of it (load the model again)."""


class ModuleMismatchError(LoadError):
    """A model's tensors do not fit a module: keys the module needs but the model lacks
    (``missing``), keys the module has no place for (``unexpected``), or tensors still on
    the meta device after loading (``on_meta``)."""

    def __init__(self, problem: str, *, model: str, module: str,
                 missing: list[str] | None = None, unexpected: list[str] | None = None,
                 on_meta: list[str] | None = None, **kw) -> None:
        kw.setdefault("models", (model,))
        super().__init__(problem, **kw)
        self.model = model
        self.module = module
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.on_meta = list(on_meta or [])


def display_path(path: str | os.PathLike) -> str:
    """A path as users typed it when possible: relative to the cwd if below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


# -- transforms -----------------------------------------------------------------------

class TransformMismatch(TdedupError):
    """A tensor transform does not apply to its input (wrong type, shape or unknown kind).

    The planner treats it as "not a candidate"; in a bundle's derived blob it is a format
    error, which the bundle reader reports with the blob."""
