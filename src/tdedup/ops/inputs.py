"""What the user names as inputs, turned into models: paths, ``NAME=PATH``, hub ids
(``hf://org/name[@rev]``, a bare ``org/name`` when no such path exists), hub cache folders
(every cached revision), bundles (their models); ``--include``/``--exclude`` globs
(matched against the names the models will have, derived from their paths or a bundle's
own, and against the path); and the refusals that protect inputs: the same input twice
(two parts of one split GGUF too), an output that is an input, a model name two inputs
would both give.

A bundle given as ``NAME=BUNDLE`` (in a merge, or to ``add``) gives its one model the name
``NAME``; a bundle of several models takes no ``NAME=``.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, OutputExistsError, UsageError
from ..format.bundle.constants import MAGIC
from ..format.checkpoints import hub_cache
from ..format.checkpoints.gguf_file import SPLIT_RE
from ..format.checkpoints.records import model_folder
from ..format.checkpoints.sources import ModelArg, assign_names, default_name, parse_model_arg
from . import check_output_file
from . import check_output_not_input  # noqa: F401 (the CLI's one import place)


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a file that starts like a tdedup bundle."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _hub_args(name: str | None, revisions: list[hub_cache.HubRevision]) -> list[ModelArg]:
    if name is not None and len(revisions) != 1:
        raise UsageError(f"{name}=... names {len(revisions)} cached revisions; a NAME= "
                         "needs exactly one")
    return [ModelArg(name or r.name, r.snapshot, r.provenance) for r in revisions]


def expand_one(arg: str) -> list[ModelArg]:
    """The models one argument names (hub folders and ids resolved offline)."""
    parsed = parse_model_arg(arg)
    text = str(parsed.path) if not arg.startswith(hub_cache.HF_PREFIX) else \
        arg.partition("=")[2] if parsed.name else arg
    if text.startswith(hub_cache.HF_PREFIX):
        ident = hub_cache.parse_hub_id(text)
        if ident is None:
            raise UsageError(f"{text!r} is not a hub id (hf://org/name[@revision])")
        return _hub_args(parsed.name, [hub_cache.resolve(*ident, given=text)])
    ident = hub_cache.parse_hub_id(text)
    if ident is not None and "/" in ident[0] and not os.path.lexists(text):
        # A bare org/name: a repo of the cache when no such path exists.
        try:
            return _hub_args(parsed.name, [hub_cache.resolve(*ident)])
        except (InputError, UsageError):
            raise InputError("no such file or folder (nor a model repo in the Hugging Face "
                             "cache)", path=text) from None
    path = parsed.path
    if path.is_dir() and hub_cache.is_repo_folder(path):
        return _hub_args(parsed.name, hub_cache.repo_revisions(path))
    if path.is_dir() and hub_cache.is_cache_root(path):
        return _hub_args(parsed.name, hub_cache.scan(path))
    return [parsed]


def scan_args(cache_dir: str | os.PathLike) -> list[ModelArg]:
    """Every cached revision of a hub cache folder, one model each (``--hf-cache``)."""
    args = _hub_args(None, hub_cache.scan(cache_dir))
    if not args:
        raise InputError("no cached model revision in this Hugging Face cache folder",
                         path=cache_dir, hint="a hub cache holds models--ORG--NAME folders; "
                         "hf download fills it")
    return args


def input_key(path: Path) -> Path:
    """What makes two inputs the same: the real path, and for a part of a split GGUF
    (``stem-0000K-of-0000N.gguf``) its first part, since any part names them all."""
    if not path.exists():
        return path
    m = SPLIT_RE.match(path.name)
    if m and path.is_file():
        return path.parent.resolve() / f"{m['stem']}-{1:05d}-of-{m['n']}.gguf"
    return path.resolve()


def expand_inputs(args: Sequence[str], *, include: Sequence[str] = (),
                  exclude: Sequence[str] = (), models: Sequence[ModelArg] = (),
                  bundle_models: bool = False) -> list[ModelArg]:
    """Every model the arguments (and ``models``, already resolved) name, filtered by the
    globs (:func:`select`), each input at most once. ``bundle_models``: the caller reads
    a bundle's models one by one (``staged_bundles``), so the globs may keep some of them
    (``ModelArg.models``); otherwise a bundle is taken whole or not at all."""
    out: list[ModelArg] = []
    given: dict[Path, str] = {}
    pairs = [(arg, m) for arg in args for m in expand_one(arg)]
    pairs += [(str(m.path), m) for m in models]
    for arg, m in pairs:
        key = input_key(m.path)
        if key in given:
            raise UsageError(f"the same input is given twice: {given[key]!r} and {arg!r}")
        given[key] = arg
        out.append(m)
    if include or exclude:
        out = select(out, include, exclude, bundle_models=bundle_models)
    if not out:
        raise UsageError("no models left to read"
                         + (" after --include/--exclude" if include or exclude else ""))
    return out


def select(args: Sequence[ModelArg], include: Sequence[str], exclude: Sequence[str], *,
           bundle_models: bool) -> list[ModelArg]:
    """The inputs ``--include``/``--exclude`` keep. A model matches a glob by its name
    (``NAME=``, a bundle's model, or the one derived from its path: the name it gets
    among all the inputs, and its shortest, the file's stem) or by its path (as given,
    or its last part). A bundle's models are matched one by one."""
    entries: list[tuple[int, ModelArg]] = []  # (input number, the model as named)
    for i, a in enumerate(args):
        if is_bundle(a.path):
            entries += [(i, ModelArg(n, a.path)) for n in bundle_names(a)]
        else:
            entries.append((i, a))
    derived = assign_names([m for _, m in entries])

    def matches(m: ModelArg, name: str, globs: Sequence[str]) -> bool:
        texts = {name, m.name or default_name(m.path)[0], str(m.path), m.path.name}
        return any(fnmatch.fnmatchcase(t, g) for g in globs for t in texts)

    kept: dict[int, list[str]] = {}
    for (i, m), name in zip(entries, derived):
        if (not include or matches(m, name, include)) and not matches(m, name, exclude):
            kept.setdefault(i, []).append(name)
    out = []
    for i, a in enumerate(args):
        if i not in kept:
            continue
        if not is_bundle(a.path) or a.name is not None:
            out.append(a)
            continue
        names = bundle_names(a)
        if kept[i] == names:
            out.append(a)
        elif bundle_models:
            out.append(ModelArg(a.name, a.path, a.hub, models=tuple(kept[i])))
        else:
            left = [n for n in names if n not in kept[i]]
            raise UsageError(f"--include/--exclude would leave out {', '.join(left)} of "
                             f"{len(names)} models of this bundle; it is taken whole",
                             path=a.path, hint=f"tdedup remove {a.path} MODEL... -o REST.tdd "
                             "makes a bundle of the models to keep")
    return out


def input_files(args: Sequence[ModelArg]) -> list[Path]:
    """The paths an output must not replace: each input's (a file, a folder, a bundle)
    and every part of a split GGUF given by one of its parts."""
    out = []
    for a in args:
        out.append(a.path)
        m = SPLIT_RE.match(a.path.name)
        if m and a.path.is_file():
            n = int(m["n"])
            out += [a.path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf")
                    for i in range(1, n + 1)]
    return out


def check_new_output(output: str | os.PathLike, force: bool) -> None:
    """Refuse to replace an existing output unless ``force``."""
    out = check_output_file(output)  # no file name at all ('', '.', a folder): one line
    if os.path.lexists(out) and not force:
        dangling = out.is_symlink() and not out.exists()
        raise OutputExistsError("the output exists" + (" (a link to a missing file)"
                                                       if dangling else ""), path=output,
                                hint="pass --force to replace it")


def bundle_names(arg: ModelArg) -> list[str]:
    """The names a bundle input's models take: their own (those ``arg.models`` keeps),
    or ``NAME`` for the one model of a bundle given as ``NAME=BUNDLE``."""
    if arg.name is None and arg.models is not None:
        return list(arg.models)
    from ..format.bundle.reader import Bundle
    with Bundle(arg.path, mapped=False) as b:
        names = list(b.model_names)
    if arg.name is None:
        return names
    if len(names) != 1:
        raise UsageError(f"{arg.name}={arg.path}: NAME= renames the model of a bundle of one "
                         f"model; this one holds {len(names)} ({', '.join(names)})",
                         hint=f"give it without NAME=; to rename MODEL, give the rest "
                         f"without it (tdedup remove {arg.path} MODEL -o REST.tdd) and MODEL "
                         f"restored (tdedup unpack {arg.path} DIR -m MODEL) as NAME=DIR/MODEL")
    return [arg.name]


def check_model_names(args: Sequence[ModelArg], *, into: ModelArg | None = None) -> None:
    """Refuse, before anything is read or restored, a model name that two inputs would
    give (``into``: the bundle the others are added to, or the one a merge keeps; the
    other models are named as ``add`` names them). The error names the input the clashing
    model comes from, the hint how to rename it."""
    holders: dict[str, Path] = {n: into.path for n in bundle_names(into)} if into else {}
    entries: list[tuple[ModelArg, ModelArg]] = []  # (the model as named, its input)
    for a in args:
        if a is not into:
            entries += ([(ModelArg(n, a.path), a) for n in bundle_names(a)] if is_bundle(a.path)
                        else [(a, a)])
    explicit: dict[str, Path] = {}
    for m, origin in entries:
        if m.name is not None:
            if m.name in holders or m.name in explicit:
                raise _clash(m.name, origin, holders.get(m.name) or explicit[m.name])
            explicit[m.name] = origin.path
    for n, (m, origin) in zip(assign_names([m for m, _ in entries]), entries):
        if m.name is None and n in holders:
            raise _clash(n, origin, holders[n])


def _clash(name: str, origin: ModelArg, holder: Path) -> UsageError:
    """The error for ``origin``'s model ``name``, which a model of ``holder`` has already."""
    if not is_bundle(origin.path):
        return UsageError(f"its model would be named {name!r}, as a model of {holder} is",
                          path=origin.path, hint="give it another name as NAME=PATH")
    from ..format.bundle.reader import Bundle
    with Bundle(origin.path, mapped=False) as b:
        count = len(b.model_names)
    if count == 1:
        hint = f"give it another name as NEWNAME={origin.path}"
    else:
        hint = (f"give the rest without it (tdedup remove {origin.path} {name} -o REST.tdd, "
                "then REST.tdd) and, to keep it under another name, restore it (tdedup "
                f"unpack {origin.path} DIR -m {name}) and give NEWNAME=DIR/{model_folder(name)}")
    return UsageError(f"holds a model named {name!r}, as {holder} does", path=origin.path,
                      hint=hint)


@contextmanager
def staged_bundles(args: list[ModelArg], workdir: str | os.PathLike | None = None,
                   *, keep_first: bool = False) -> Iterator[list[ModelArg]]:
    """Bundle inputs replaced by their models (those ``ModelArg.models`` keeps), restored
    (sha256-checked) into a temporary folder under ``workdir`` that is removed
    afterwards; each keeps the bundle's path as ``ModelArg.bundle``. ``keep_first``: the
    first bundle stays as it is (``pack`` adds the rest to it without re-encoding it)."""
    stage: Path | None = None
    out: list[ModelArg] = []
    kept_one = not keep_first
    try:
        for i, a in enumerate(args):
            if not is_bundle(a.path):
                out.append(a)
                continue
            if not kept_one:
                kept_one = True
                out.append(a)
                continue
            names = bundle_names(a)  # NAME=BUNDLE renames its one model
            if stage is None:
                stage = Path(tempfile.mkdtemp(prefix=".tdedup-stage-", dir=workdir))
            dest = stage / str(i)
            from ..format.bundle.reader import Bundle
            from .unpack import unpack
            unpack(a.path, dest, models=a.models)
            with Bundle(a.path) as b:
                chosen = [m for m in b.manifest.models
                          if a.models is None or m.name in a.models]
                for m, name in zip(chosen, names):
                    folder = dest / model_folder(m.name)
                    single = len(m.files) == 1 and m.layout == m.files[0].kind
                    out.append(ModelArg(name, folder / m.files[0].path if single else folder,
                                        m.hub, bundle=a.path))
        yield out
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
