"""Turn the paths a user gives into models: files, sharded folders, Diffusers pipelines.

A *model* is what one command-line argument names:

- a single ``.safetensors`` or ``.gguf`` file;
- one part of a split GGUF (``name-00001-of-00003.gguf``): all its parts;
- a folder: every file below it. ``.safetensors`` and ``.gguf`` files are indexed as
  weights; every other file (``config.json``, tokenizer files, ``model_index.json``,
  ``model.safetensors.index.json``, an empty ``.safetensors``) is kept as an opaque file
  so that a bundle restores the folder exactly. A sharded folder's index is checked
  against the shards present. Links are followed only while they stay inside the folder.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..._fs import TEMP_NAME_RE
from ...errors import (
    CheckpointFormatError,
    InputError,
    UnsupportedFormatError,
    UsageError,
)
from ..bundle.constants import MAGIC as BUNDLE_MAGIC
from ..strict_json import loads_strict
from .gguf_file import GGUF_MAGIC, SPLIT_RE, check_split, read_gguf
from .hub_cache import blob_name, link_roots
from .records import FileKind, ModelLayout, ModelSource, SourceFile, is_model_name
from .safetensors import read_safetensors

WEIGHT_SUFFIXES = {".safetensors": FileKind.SAFETENSORS, ".gguf": FileKind.GGUF}
#: Why a folder scan leaves out a link whose target lies outside the model folder.
OUT_LINK = "link out of the model folder"


@dataclass(frozen=True, slots=True)
class ModelArg:
    """A model as given: an optional explicit name and a path."""

    name: str | None
    path: Path
    #: Hub provenance of a cached revision (``hub_cache.HubRevision.provenance``).
    hub: dict | None = None
    #: A bundle input: the names of its models to read (None: every model).
    models: tuple[str, ...] | None = None
    #: A model restored from a bundle: the bundle (``path`` is then a staging folder).
    bundle: Path | None = None


def parse_model_arg(arg: str) -> ModelArg:
    """Parse ``NAME=PATH`` or ``PATH``. A path that exists as written wins over a split."""
    if "=" in arg and not os.path.exists(arg):
        name, _, path = arg.partition("=")
        name = unicodedata.normalize("NFC", name)
        if not is_model_name(name):
            raise UsageError(f"model name {name!r} must be letters, digits, '.', '_' or '-' "
                             "(at most 200), starting with a letter or digit; or a hub id "
                             "org/name[@revision]")
        return ModelArg(name, Path(path))
    return ModelArg(None, Path(arg))


def sniff_kind(path: Path) -> FileKind:
    """Tell safetensors from GGUF by suffix, or by the first bytes when the suffix is odd."""
    kind = WEIGHT_SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        return kind
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from e
    if head[:4] == GGUF_MAGIC:
        return FileKind.GGUF
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (1 << 27):
        return FileKind.SAFETENSORS
    if head[:len(BUNDLE_MAGIC)] == BUNDLE_MAGIC:
        raise UnsupportedFormatError(
            "a tdedup bundle, not a checkpoint", path=path,
            hint="tdedup pack A.tdd B.tdd -o OUT merges bundles (tdedup.merge in Python); "
                 "tdedup unpack restores a bundle's files")
    raise UnsupportedFormatError("neither a safetensors nor a GGUF file", path=path)


def read_weight_file(path: Path, kind: FileKind, model: str, rel: str) -> SourceFile:
    """Index one weight file with the reader its kind names."""
    reader = read_gguf if kind is FileKind.GGUF else read_safetensors
    return reader(path, model=model, rel_path=rel)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from e


def _other_file(path: Path, rel: str) -> SourceFile:
    return SourceFile(rel, path, _size(path), FileKind.OTHER)


def _split_parts(path: Path) -> list[Path] | None:
    m = SPLIT_RE.match(path.name)
    if not m:
        return None
    n = int(m["n"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise InputError(f"split GGUF is missing part(s) {', '.join(missing)}", path=path)
    return parts


def _walk(folder: Path, skipped: list[str] | None = None) -> list[Path]:
    """Every regular file below ``folder``, hidden folders and the temporary files of
    interrupted tdedup writes skipped. A link to a file is followed wherever it points
    (weights linked into a shared store, as ``hf download --local-dir`` once made them, are
    the model's weights); a link to a folder only where its target (resolved) stays inside
    ``folder`` (or, in a hub snapshot, the cache's blobs: :func:`hub_cache.link_roots`):
    ``loop -> ..`` would pack every sibling model. What else is left out (hidden folders,
    folder links out of the model folder, folders that cannot be listed, FIFOs, sockets,
    devices, dangling links) is appended to ``skipped`` as ``"rel/path (why)"``;
    ``folder`` itself unlisted is an error."""
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()  # followed links could otherwise loop forever
    skipped = skipped if skipped is not None else []
    inside = [Path(os.path.realpath(r)) for r in (folder, *link_roots(folder))]

    def rel(p: Path) -> str:
        return p.relative_to(folder).as_posix()

    def leaves(p: Path) -> bool:
        """Whether ``p`` is a link whose target lies outside the model folder."""
        if not p.is_symlink():
            return False
        target = Path(os.path.realpath(p))
        return not any(target.is_relative_to(r) for r in inside)

    def unlisted(e: OSError) -> None:  # os.walk's default drops these silently
        where = Path(e.filename) if e.filename else folder
        if where == folder:
            raise InputError(f"cannot list this folder: {e.strerror or e}", path=folder)
        skipped.append(f"{rel(where)}/ (cannot be listed: {e.strerror or e})")

    for root, dirs, files in os.walk(folder, onerror=unlisted, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        # Hidden *files* are part of a model (.gitattributes ships with every hub repo);
        # hidden *folders* are caches and VCS data (.cache/huggingface, .git).
        skipped.extend(f"{rel(Path(root) / d)}/ (hidden folder)" for d in sorted(dirs)
                       if d.startswith("."))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out_links = [d for d in dirs if leaves(Path(root) / d)]
        skipped.extend(f"{rel(Path(root) / d)}/ ({OUT_LINK})" for d in out_links)
        dirs[:] = [d for d in dirs if d not in out_links]
        for f in sorted(files):
            p = Path(root) / f
            if TEMP_NAME_RE.match(f):
                continue
            try:
                regular = stat.S_ISREG(os.stat(p).st_mode)
            except FileNotFoundError:
                skipped.append(f"{rel(p)} (dangling link)" if p.is_symlink()
                               else f"{rel(p)} (removed while listed)")
            except OSError as e:
                skipped.append(f"{rel(p)} (cannot be read: {e.strerror or e})")
            else:
                if regular:
                    out.append(p)
                else:
                    skipped.append(f"{rel(p)} (not a regular file)")
    return out


def _check_shard_index(folder: Path, files: list[Path]) -> None:
    for index in (p for p in files if p.name.endswith(".safetensors.index.json")):
        try:
            doc = loads_strict(index.read_bytes())
            weight_map = doc["weight_map"] if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError("no 'weight_map' object")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError("'weight_map' must map tensor names to file names (strings)")
            shards = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"malformed shard index ({e})", path=index) from None
        for shard in sorted(shards):
            if not (index.parent / shard).is_file():
                raise InputError(f"shard {shard!r} listed in {index.name} is missing",
                                 path=folder)


def default_name(path: Path) -> list[str]:
    """Name candidates for a path, shortest first: stem, then parent-stem, ...

    From the path as given, made absolute without following links: a link names the
    model, not its target (a hub snapshot's ``model.safetensors`` points at a blob named
    by its hash; ``q4.gguf -> q8_0.gguf`` is the model ``q4``)."""
    p = Path(os.path.abspath(path))
    if p.is_file():
        m = SPLIT_RE.match(p.name)
        stem = m["stem"] if m else (p.stem if p.suffix.lower() in WEIGHT_SUFFIXES else p.name)
        parts = [*p.parent.parts[1:], stem]
    else:
        parts = list(p.parts[1:])
    parts = [re.sub(r"[^\w.-]+", "_", unicodedata.normalize("NFC", s)).lstrip("._-")[:100]
             or "model" for s in parts]
    return ["-".join(parts[-k:]) for k in range(1, len(parts) + 1)] or ["model"]


def assign_names(args: list[ModelArg]) -> list[str]:
    """Explicit names as given; derived names made unique with as few path parts as needed."""
    explicit = [a.name for a in args if a.name]
    dup = {n for n in explicit if explicit.count(n) > 1}
    if dup:
        raise UsageError(f"model name {sorted(dup)[0]!r} is given twice")
    candidates = [default_name(a.path) if not a.name else [a.name] for a in args]
    depth = [0] * len(args)
    while True:
        names = [c[min(d, len(c) - 1)] for c, d in zip(candidates, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        moved = False
        for i, n in enumerate(names):
            if n in clashes and not args[i].name and depth[i] < len(candidates[i]) - 1:
                depth[i] += 1
                moved = True
        if not moved:  # the same path twice: number the repeats
            seen: dict[str, int] = {}
            out = []
            for n in names:
                seen[n] = seen.get(n, 0) + 1
                out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
            return out


def open_model(arg: ModelArg, name: str) -> ModelSource:
    """Index one model: its weight files (tensor ranges) and its other files."""
    path = arg.path
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    if path.is_file():
        kind = sniff_kind(path)
        parts = _split_parts(path) if kind is FileKind.GGUF else None
        if parts:
            split = [read_gguf(p, model=name, rel_path=p.name) for p in parts]
            check_split(split)
            return ModelSource(name, path, ModelLayout.GGUF_SPLIT, split)
        return ModelSource(name, path, ModelLayout(kind.value),
                           [read_weight_file(path, kind, name, path.name)])
    if not path.is_dir():
        raise InputError("not a regular file or folder", path=path)
    skipped: list[str] = []
    found = _walk(path, skipped)
    _check_shard_index(path, found)
    files: list[SourceFile] = []
    for p in found:
        rel = p.relative_to(path).as_posix()
        weight_kind = WEIGHT_SUFFIXES.get(p.suffix.lower())
        if weight_kind and _size(p) == 0:
            # An empty placeholder (an interrupted save, a touch): no tensors to index, so
            # it is kept byte for byte like any other file instead of failing the model.
            weight_kind = None
        files.append(read_weight_file(p, weight_kind, name, rel) if weight_kind
                     else _other_file(p, rel))
    if not any(f.kind is not FileKind.OTHER for f in files):
        raise UnsupportedFormatError("no .safetensors or .gguf files in this folder", path=path)
    names = {p.name for p in found}
    layout = (ModelLayout.DIFFUSERS if "model_index.json" in names
              else ModelLayout.SHARDED if any(n.endswith(".safetensors.index.json") for n in names)
              else ModelLayout.FOLDER)
    if arg.hub is not None:  # a hub snapshot: remember which cache blob each file is
        for f in files:
            etag = blob_name(f.abs_path)
            if etag is not None:
                f.info["hub_blob"] = etag
    return ModelSource(name, path, layout, files, skipped, hub=arg.hub)


def open_models(args: Sequence[str | ModelArg]) -> list[ModelSource]:
    """Parse and index every model argument; names are made unique."""
    parsed = [a if isinstance(a, ModelArg) else parse_model_arg(str(a)) for a in args]
    if not parsed:
        raise UsageError("no models given")
    names = assign_names(parsed)
    return [open_model(a, n) for a, n in zip(parsed, names)]
