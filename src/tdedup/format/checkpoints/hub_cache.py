"""The Hugging Face hub cache as model inputs, read through ``huggingface_hub``'s own cache
API (``scan_cache_dir``; the cache folder as ``huggingface_hub.constants`` resolves it from
``HF_HUB_CACHE`` / ``HF_HOME``), never by a hand-written walk of its folders.

One model per cached revision of a model repository, named ``org/name@rev`` (a ref name
that points at the revision, ``main`` first, else the first 7 digits of its commit). Its
files are the snapshot's, whose symlinks are followed; ``blobs/`` is never read as a model.
Each model carries its provenance (repo id, commit, refs, and per file the cache blob it
points at) so that ``unpack --hf-cache`` can rebuild the cache layout.

``huggingface_hub`` is an optional extra (``tdedup[hf]``), imported only here and only
when a cache is asked about.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError, UsageError

HF_PREFIX = "hf://"
SHORT_COMMIT = 7
#: ``org/name`` or ``name`` as the hub spells repo ids, optionally ``@revision``.
HUB_ID_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)"
                       r"(?:@(?P<rev>[\w./-]+))?")


def hub():
    """``huggingface_hub``, or a one-line error naming the extra that provides it."""
    try:
        import huggingface_hub
    except ImportError:
        raise UsageError("reading the Hugging Face cache needs huggingface_hub",
                         hint="pip install 'tdedup[hf]'") from None
    return huggingface_hub


def default_cache_dir() -> Path:
    """The hub cache folder as huggingface_hub resolves it (HF_HUB_CACHE, HF_HOME, ...).
    (``constants`` is imported by name: huggingface_hub 2 no longer imports it with the
    package, and ``hub().constants`` failed in a process that had not imported it.)"""
    hub()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@dataclass(frozen=True, slots=True)
class HubRevision:
    """One cached revision of a model repository."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]
    snapshot: Path

    @property
    def rev_name(self) -> str:
        """A ref that points here (``main`` first) if it is a plain name, else a short
        commit."""
        plain = [r for r in self.refs if re.fullmatch(r"[\w][\w.-]*", r)]
        plain.sort(key=lambda r: (r != "main", r))
        return plain[0] if plain else self.commit[:SHORT_COMMIT]

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.rev_name}"

    @property
    def provenance(self) -> dict:
        return {"repo_id": self.repo_id, "commit": self.commit, "refs": sorted(self.refs)}


def scan(cache_dir: str | os.PathLike | None = None) -> list[HubRevision]:
    """Every cached revision of every model repository, by repo id then name."""
    h = hub()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        info = h.scan_cache_dir(folder)
    except h.CacheNotFound:
        raise InputError("no Hugging Face cache here", path=folder) from None
    except ValueError as e:  # a file where the cache folder should be
        raise InputError(f"not a Hugging Face cache ({e})", path=folder) from None
    out = [HubRevision(r.repo_id, rev.commit_hash, tuple(sorted(rev.refs)),
                       Path(rev.snapshot_path))
           for r in info.repos if r.repo_type == "model" for rev in r.revisions]
    # Newest-named first within a repo would be arbitrary; refs first, then by commit.
    out.sort(key=lambda r: (r.repo_id, not r.refs, r.rev_name, r.commit))
    return out


def repo_revisions(repo_folder: Path) -> list[HubRevision]:
    """The revisions of one cached repo folder (``models--org--name``)."""
    real = repo_folder.resolve()
    return [r for r in scan(real.parent) if r.snapshot.resolve().parent.parent == real]


def is_cache_root(path: Path) -> bool:
    """A folder holding ``models--*`` repo folders (the hub cache itself)."""
    return path.is_dir() and any(p.name.startswith("models--") and (p / "snapshots").is_dir()
                                 for p in path.iterdir())


def is_repo_folder(path: Path) -> bool:
    """A cached repo folder: ``models--org--name`` with ``snapshots/``."""
    return path.name.startswith("models--") and (path / "snapshots").is_dir()


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` of ``hf://org/name[@rev]`` or ``org/name[@rev]``, else None."""
    m = HUB_ID_RE.fullmatch(text.removeprefix(HF_PREFIX))
    return (m["repo"], m["rev"]) if m else None


def resolve(repo_id: str, rev: str | None, cache_dir: str | os.PathLike | None = None,
            *, given: str | None = None) -> HubRevision:
    """The cached revision ``repo_id@rev`` (a ref name or a commit prefix; no ``rev``:
    ``main``, or the only revision), offline. Errors name ``given``, the argument as the
    user wrote it (``hf://org/name``), else ``repo_id[@rev]``, and say which cache was
    looked in."""
    spelled = given or (f"{repo_id}@{rev}" if rev else repo_id)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    missing_hint = "download it first (hf download); tdedup never goes online"
    try:
        cached = scan(folder)
    except InputError as e:  # no cache at all: the argument is what the user looks for
        raise InputError(f"not in the Hugging Face cache ({e.message})", path=spelled,
                         hint=missing_hint) from None
    revisions = [r for r in cached if r.repo_id == repo_id]
    if not revisions:
        raise InputError(f"not in the Hugging Face cache {folder}", path=spelled,
                         hint=missing_hint)
    if rev is None:
        main = [r for r in revisions if "main" in r.refs]
        if main or len(revisions) == 1:
            return (main or revisions)[0]
        raise UsageError(f"{repo_id} has {len(revisions)} cached revisions and no 'main'; "
                         f"name one: {', '.join(r.name for r in revisions)}")
    for r in revisions:
        if rev in r.refs or (len(rev) >= 4 and r.commit.startswith(rev)):
            return r
    raise InputError(f"revision {rev} is not in the Hugging Face cache (cached: "
                     f"{', '.join(r.name for r in revisions)})", path=spelled)


def link_roots(folder: Path) -> list[Path]:
    """Folders outside ``folder`` that its links may lead into: for a hub snapshot (or a
    folder within one, given as a plain path or as a cached revision), its repo's
    ``blobs/`` and the cache's shared blob store (``<cache>/blobs``, where
    huggingface_hub's repo blobs may themselves link); for any other folder, none."""
    for p in (Path(os.path.abspath(folder)), Path(os.path.realpath(folder))):
        for snapshot in (p, *p.parents):
            repo = snapshot.parent.parent
            if snapshot.parent.name == "snapshots" and is_repo_folder(repo):
                return [repo / "blobs", repo.parent / "blobs"]
    return []


def blob_name(path: Path) -> str | None:
    """The cache blob a snapshot file's symlink points at (its etag), if it is one."""
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    return target.name if target.parent.name == "blobs" else None
