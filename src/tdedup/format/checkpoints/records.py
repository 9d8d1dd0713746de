"""Records that every checkpoint reader yields: one common shape for all formats."""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

#: One part of a model name: Unicode letters and digits (and '.', '_', '-' inside), so
#: nothing that could name a parent folder, a hidden file or carry a control character.
_PART = r"[^\W_][\w.-]*"
#: A model name: a part, or a hub id ``org/name`` (one '/'), optionally ``@revision``
#: (a short commit or a ref name). NFC-normalised, at most MAX_NAME_CHARS characters.
MODEL_NAME_RE = re.compile(rf"{_PART}(?:/{_PART})?(?:@{_PART})?")
MAX_NAME_CHARS = 200


#: The most elements a tensor's shape may describe, counting every zero dimension as 1:
#: torch sizes storage in int64 bytes and refuses ("Storage size calculation overflowed")
#: a shape past this even when a zero dimension makes it empty (spec/FORMAT.md §12).
MAX_SHAPE_PRODUCT = 1 << 59


def shape_overflows(shape) -> bool:
    """Whether a shape's dimensions (a zero counted as 1) multiply past
    :data:`MAX_SHAPE_PRODUCT`: such a tensor packs but could never be loaded."""
    product = 1
    for d in shape:
        product *= max(int(d), 1)
        if product > MAX_SHAPE_PRODUCT:
            return True
    return False


def is_model_name(name: object) -> bool:
    """Whether ``name`` is a valid model name (the whole string: a trailing newline is not)."""
    return (isinstance(name, str) and len(name) <= MAX_NAME_CHARS
            and unicodedata.normalize("NFC", name) == name
            and MODEL_NAME_RE.fullmatch(name) is not None)


def model_folder(name: str) -> str:
    """The folder a model unpacks into: its name with a hub id's '/' as '--' (the hub's
    own convention, ``models--org--name``), so every model is one folder below DEST."""
    return name.replace("/", "--")


class FileKind(str, enum.Enum):
    """What a file of a model is. The value is what manifests and reports write."""

    SAFETENSORS = "safetensors"
    GGUF = "gguf"
    OTHER = "other"  # config.json, tokenizer files, model_index.json, ...


class ModelLayout(str, enum.Enum):
    """How a model's files are laid out. The value is what manifests and reports write
    (``spec/FORMAT.md`` lists them; readers keep unknown values as plain strings)."""

    SAFETENSORS = "safetensors"  # one .safetensors file
    GGUF = "gguf"  # one .gguf file
    GGUF_SPLIT = "gguf-split"  # a split GGUF (name-00001-of-0000N.gguf)
    SHARDED = "sharded"  # a folder with a safetensors shard index
    DIFFUSERS = "diffusers"  # a folder with model_index.json
    FOLDER = "folder"  # any other folder


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One tensor of one checkpoint file, located by its bytes in that file.

    ``dtype`` is the safetensors dtype (``"F32"``, ``"BF16"``, ...) or the GGML type name
    (``"Q4_1"``, ``"F16"``, ...) of a GGUF tensor. ``shape`` is the logical shape in the
    row-major order torch and numpy use (GGUF's reversed dimension order already undone).
    ``offset`` is absolute within the file, ``length`` the number of stored bytes.
    """

    model: str
    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class SourceFile:
    """One file of a model: its path relative to the model's root and its tensors."""

    rel_path: str  # POSIX, relative to the model root
    abs_path: Path
    size: int
    kind: FileKind
    tensors: list[TensorRecord] = field(default_factory=list)
    # Format-specific facts worth reporting (GGUF architecture, safetensors metadata).
    info: dict = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.length for t in self.tensors)


@dataclass(slots=True)
class ModelSource:
    """One model given on the command line: a file or a folder of files."""

    name: str
    path: Path  # as given (file or folder)
    layout: ModelLayout
    files: list[SourceFile] = field(default_factory=list)
    #: What a folder scan left out, as ``"rel/path (why)"``: hidden folders, FIFOs and
    #: other non-regular files, dangling links. Reported, never dropped silently.
    skipped: list[str] = field(default_factory=list)
    hub: dict | None = None  # provenance of a hub cache revision (repo_id, commit, refs)

    @property
    def tensors(self) -> list[TensorRecord]:
        return [t for f in self.files for t in f.tensors]

    @property
    def weight_files(self) -> list[SourceFile]:
        return [f for f in self.files if f.kind is not FileKind.OTHER]

    @property
    def tensor_bytes(self) -> int:
        return sum(f.tensor_bytes for f in self.files)
