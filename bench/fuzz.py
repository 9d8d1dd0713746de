"""The long fuzz run: the generators of tests/test_fuzz_*.py on more seeds, the corpus
(SmolLM included), a packed corpus bundle, random edits until a time budget is spent, and
every single-bit flip of the tiny bundle.

    python bench/fuzz.py [--corpus DIR] [--seconds 600] [--write]

Every case must end in a TdedupError or succeed (and an unpack that fails must leave no
file); the first case that ends otherwise (another exception, a hang past 10 s) stops the
run with its description. Prints a Markdown table of cases per group; ``--write`` puts it
in bench/RESULTS.md under ``## fuzz``.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import itertools
import json
import os
import platform
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import hostile_helpers as hh  # noqa: E402
import test_fuzz_bundles as tb  # noqa: E402
import test_fuzz_checkpoints as tc  # noqa: E402
import test_fuzz_strings_races as tsr  # noqa: E402

import tdedup  # noqa: E402
from tdedup.format.checkpoints.records import FileKind  # noqa: E402
from common import add_corpus_option  # noqa: E402

CORPUS_FILES = tc.CORPUS_FILES + [("smollm/q4_1.gguf", FileKind.GGUF),
                                  ("minilm/f16.safetensors", FileKind.SAFETENSORS),
                                  ("minilm-gguf/f16.gguf", FileKind.GGUF)]


class Groups:
    """Cases per group, with their outcome counts and time."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}

    def run(self, name: str, fn) -> None:
        tally = hh.Tally()
        t0 = time.perf_counter()
        fn(tally)
        secs = time.perf_counter() - t0
        self.rows[name] = [tally, secs]
        print(f"{name}: {tally.cases} cases ({tally.refused} refused, {tally.accepted} "
              f"valid) in {secs:.1f} s", flush=True)

    def table(self) -> str:
        lines = ["| group | cases | refused (TdedupError) | accepted as valid | seconds |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        total = hh.Tally()
        secs = 0.0
        for name, (t, s) in self.rows.items():
            lines.append(f"| {name} | {t.cases:,} | {t.refused:,} | {t.accepted:,} | {s:.1f} |")
            total.add(t)
            secs += s
        lines.append(f"| **total** | **{total.cases:,}** | {total.refused:,} | "
                     f"{total.accepted:,} | {secs:.1f} |")
        errors = ", ".join(f"{k} {v:,}" for k, v in sorted(total.by_error.items()))
        return "\n".join(lines) + (f"\n\nRefusals by error class (the bit flips, counted "
                                   f"by verify alone, not classed): {errors}.")


# -- checkpoints -----------------------------------------------------------------------------

def checkpoint_seeds(root: Path) -> list[tuple[str, FileKind, Path]]:
    import gguf
    import numpy as np

    from helpers import factory

    seeds = []
    for s in range(3):
        fam = hh.make_tiny_family(root / f"fam{s}", seed=s, empty=bool(s % 2))
        seeds += [(f"tiny{s}.safetensors", FileKind.SAFETENSORS, fam["base"] / "model.safetensors"),
                  (f"tiny{s}.gguf", FileKind.GGUF, fam["gguf"])]
    tensors = factory.random_tensors(7, {"token_embd.weight": (64, 32), "blk.0.attn_q.weight":
                                         (32, 32), "output_norm.weight": (32,)})
    q8 = {n: gguf.GGMLQuantizationType.Q8_0 for n, a in tensors.items() if a.ndim == 2}
    seeds.append(("vocab.gguf", FileKind.GGUF, factory.make_gguf(
        root / "vocab.gguf", tensors, vocab=factory.DEFAULT_VOCAB, quantize=q8, alignment=64)))
    parts = factory.make_split_gguf(root / "split" / "s.gguf", tensors, 2)
    seeds.append(("split-part.gguf", FileKind.GGUF, parts[0]))
    seeds.append(("dtypes.safetensors", FileKind.SAFETENSORS, factory.make_safetensors(
        root / "dtypes.safetensors",
        {"f16": np.ones(7, np.float16), "i8": np.arange(5, dtype=np.int8),
         "b": np.array([True, False]), "u64": np.arange(3, dtype=np.uint64),
         "scalar": np.array(1.5, np.float32)}, metadata={"k": "v"})))
    return seeds


def random_edits(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        off = rng.randrange(len(b)) if b else 0
        if op < 0.6 and b:
            b[off] = rng.randrange(256)
        elif op < 0.75:
            b[off:off] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        elif op < 0.9 and b:
            del b[off:off + rng.randint(1, 9)]
        elif len(b) >= 8:  # an aligned u64 set to a boundary value
            pos = rng.randrange(0, len(b) - 7)
            struct.pack_into("<Q", b, pos, rng.choice(hh.BAD_INTS) % 2**64)
    if rng.random() < 0.2:
        b = b[:rng.randrange(len(b) + 1)]
    return bytes(b)


def fuzz_checkpoints(groups: Groups, root: Path, scratch: Path, corpus: Path | None,
                     budget: float) -> None:
    seeds = checkpoint_seeds(root / "ckpt")

    def enumerated(tally):
        for name, kind, path in seeds:
            tc.run_cases(kind, tc.cases_of(kind, path), scratch, tally, cli_every=25)
    groups.run("checkpoints: enumerated mutations (tiny real files, 10 seeds)", enumerated)

    if corpus is not None:
        def corpus_headers(tally):
            for rel, kind in CORPUS_FILES:
                path = corpus / rel
                if not path.is_file():
                    continue
                size = path.stat().st_size
                with open(path, "rb") as f:
                    head = f.read(tc.header_end(kind, path) + 64)
                tc.run_cases(kind, tc.cases_of(kind, path, size=size, every_byte=False,
                                               data=head, max_tensors=12),
                             scratch, tally, cli_every=100)
        groups.run("checkpoints: corpus headers (sparse copies)", corpus_headers)

    def randomized(tally):
        rng = random.Random(0)
        datas = [(kind, path.read_bytes()) for _, kind, path in seeds]
        end = time.monotonic() + budget
        i = 0
        while time.monotonic() < end:
            kind, data = datas[i % len(datas)]
            i += 1
            target = hh.write_case(scratch / f"r.{kind.value}", random_edits(data, rng))
            tally.cases += 1
            hh.expect_refusal_or_success(lambda: tc.read(kind, target),
                                         f"random edit #{i} of seed {i % len(datas)}", tally)
    groups.run(f"checkpoints: random edits ({budget:.0f} s)", randomized)


# -- bundles ---------------------------------------------------------------------------------

def fuzz_bundles(groups: Groups, root: Path, scratch: Path, corpus: Path | None,
                 budget: float) -> None:
    seeds = [hh.pack_tiny_family(root / f"b{s}", empty=bool(s % 2)) for s in range(2)]
    if corpus is not None and (corpus / "minilm/lora-adapter").is_dir():
        big = root / "corpus.tdd"
        tdedup.pack([f"lora={corpus / 'minilm/lora-adapter'}"], big)  # 298 kB of tensors
        seeds.append(big)
    case = scratch / "bundle" / "case.tdd"
    case.parent.mkdir(parents=True, exist_ok=True)

    def enumerated(tally):
        for seed in seeds:
            small = seed.stat().st_size < 64 << 10
            for label, data in tb.structural_cases(seed):
                case.write_bytes(data)
                tb.check_bundle(case, label, tally, load=small)
            doc = hh.read_parts(seed).manifest
            for label, edit in hh.manifest_edits(doc, limit_paths=None if small else 150):
                hh.rewrite_manifest(seed, case, edit, append=hh.EDIT_ROOM)
                tb.check_bundle(case, label, tally, load=small)
            for label, append, edit in hh.bomb_edits(doc):
                hh.rewrite_manifest(seed, case, edit, append=append, scrub=True)
                tb.check_bundle(case, label, tally, cli=True)
    groups.run(f"bundles: enumerated mutations ({len(seeds)} real bundles)", enumerated)

    def flips(tally):
        path = scratch / "flip" / "tiny.tdd"
        path.parent.mkdir()
        shutil.copyfile(seeds[0], path)
        masks = [1 << k for k in range(8)]
        import test_corrupt_exhaustive as tx
        before = tally.cases
        misses = tx.misses(path, tdedup.verify, masks=masks)
        tally.cases += path.stat().st_size * len(masks)
        tally.refused += tally.cases - before - len(misses)
        assert misses == [], misses[:10]
    groups.run("bundles: every single-bit flip of the tiny bundle (verify)", flips)

    def randomized(tally):
        rng = random.Random(1)
        end = time.monotonic() + budget
        i = 0
        texts = [(s, hh.read_parts(s)) for s in seeds if s.stat().st_size < 64 << 10]
        while time.monotonic() < end:
            i += 1
            seed, parts = texts[i % len(texts)]
            r = rng.random()
            if r < 0.4:  # random JSON values at random places of the manifest
                doc = json.loads(json.dumps(parts.manifest))
                paths = list(hh.manifest_paths(doc))
                for _ in range(rng.randint(1, 3)):
                    p = rng.choice(paths)
                    try:
                        hh.set_path(doc, p, copy.deepcopy(rng.choice(hh.BAD_JSON)))
                    except (KeyError, IndexError, TypeError):
                        pass
                data = hh.bundle_bytes(parts.prefix, json.dumps(doc).encode(),
                                       major=parts.major, minor=parts.minor)
            elif r < 0.7:  # bytes of the manifest text
                text = json.dumps(parts.manifest).encode()
                data = hh.bundle_bytes(parts.prefix, random_edits(text, rng),
                                       major=parts.major, minor=parts.minor)
            else:  # bytes anywhere
                data = random_edits(seed.read_bytes(), rng)
            case.write_bytes(data)
            tb.check_bundle(case, f"random bundle edit #{i}", tally, load=i % 5 == 0)
    groups.run(f"bundles: random edits ({budget:.0f} s)", randomized)


# -- strings and races (issue 14) ----------------------------------------------------------

def fuzz_strings_races(groups: Groups, root: Path, scratch: Path, seeds: int = 3) -> None:
    bundles = [hh.pack_tiny_family(root / f"sr{s}", empty=bool(s % 2)) for s in range(seeds)]

    def strings(tally):
        case = scratch / "strings" / "case.tdd"
        case.parent.mkdir(parents=True, exist_ok=True)
        for b in bundles:
            tsr.manifest_string_cases(b, case, ["inspect", "verify", "unpack"], tally)
        tsr.checkpoint_string_cases(scratch / "strings-ckpt", ["analyze", "pack"], tally)
    groups.run(f"strings: {len(tsr.HOSTILE_STRINGS)} hostile strings x every printed field "
               f"({len(bundles)} bundles, inspect/verify/unpack; checkpoints, analyze/pack)",
               strings)

    def races(tally):
        for i in range(seeds):
            tsr.pack_race_cases(root / f"race-src{i}", scratch / f"race-pack{i}", tally)
        for i, b in enumerate(bundles):
            work = scratch / f"race-bundle{i}"
            work.mkdir()
            tsr.bundle_race_cases(b, work, tally)
    groups.run(f"races: input replaced/rewritten/truncated/removed at every pack event, "
               f"bundle truncated or link swapped at every verify/unpack event ({seeds} seeds)",
               races)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_option(ap)
    ap.add_argument("--seconds", type=float, default=600,
                    help="time for the random-edit groups (split between them)")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md ## fuzz")
    ap.add_argument("--only-strings-races", action="store_true",
                    help="run only the string and race groups (issue 14); never --write")
    args = ap.parse_args()
    faulthandler.enable()
    corpus = args.corpus if (args.corpus / "MANIFEST.sha256").is_file() else None
    groups = Groups()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tdedup-fuzz-") as tmp:
        root = Path(tmp)
        scratch = hh.scratch_dir(root / "scratch")
        try:
            if not args.only_strings_races:
                fuzz_checkpoints(groups, root, scratch, corpus, args.seconds / 2)
                fuzz_bundles(groups, root, scratch, corpus, args.seconds / 2)
            fuzz_strings_races(groups, root, scratch)
        finally:
            if scratch.parent != root:
                shutil.rmtree(scratch, ignore_errors=True)
    wall = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    table = groups.table()
    print("\n" + table)
    with tempfile.TemporaryDirectory(prefix="tdedup-fuzz-ci-") as tmp:
        ci = ci_counts(Path(tmp), corpus)
    print("\n" + ci)
    if args.write and not args.only_strings_races:
        write_section(table, ci, wall, commit, corpus is not None, args.seconds)


def ci_counts(root: Path, corpus: Path | None) -> str:
    """How many cases the CI tests run, counted from the same generators and seeds."""
    fam = hh.make_tiny_family(root / "ci-fam", empty=True)
    ckpt = sum(sum(1 for _ in tc.cases_of(kind, path)) for kind, path in (
        (FileKind.SAFETENSORS, fam["base"] / "model.safetensors"), (FileKind.GGUF, fam["gguf"])))
    corpus_n = 0
    for rel, kind in tc.CORPUS_FILES if corpus is not None else ():
        path = corpus / rel
        if path.is_file():
            with open(path, "rb") as f:
                head = f.read(tc.header_end(kind, path) + 64)
            corpus_n += sum(1 for _ in itertools.islice(tc.cases_of(
                kind, path, size=path.stat().st_size, every_byte=False, data=head,
                max_tensors=4), 0, None, 2))
    seed = hh.pack_tiny_family(root / "ci-bundle", empty=True)
    doc = hh.read_parts(seed).manifest
    bundles = (sum(1 for _ in tb.structural_cases(seed)) + sum(1 for _ in hh.manifest_edits(doc))
               + sum(1 for _ in hh.bomb_edits(doc)))
    tiny = hh.pack_tiny_family(root / "ci-tiny").stat().st_size
    rows = [("test_fuzz_checkpoints.py: enumerated mutations of the tiny safetensors and GGUF",
             ckpt),
            ("test_fuzz_checkpoints.py: hypothesis (byte edits, header JSON values, GGUF fields)",
             3 * tc.FUZZ.max_examples),
            ("test_fuzz_checkpoints.py: corpus headers (MiniLM, its LoRA adapter, Q8_0 GGUF)",
             corpus_n),
            ("test_fuzz_bundles.py: enumerated (truncations, footer/header fields, every "
             "manifest value, attacks, bombs)", bundles),
            ("test_fuzz_bundles.py: hypothesis (manifest values, manifest text, bytes and "
             "footer fields)", 3 * tb.FUZZ.max_examples),
            (f"test_corrupt_exhaustive.py: every byte of the {tiny:,}-byte bundle flipped, "
             "x verify / unpack / load(verify=True)", 3 * tiny),
            ("test_fuzz_strings_races.py: hostile strings x printed fields and checkpoint "
             "names, races at every progress event", strings_races_ci(root))]
    lines = ["| CI test | cases |", "| --- | ---: |"]
    lines += [f"| {name} | {n:,} |" for name, n in rows]
    lines.append(f"| **total** | **{sum(n for _, n in rows):,}** |")
    return "\n".join(lines)


def strings_races_ci(root: Path) -> int:
    """How many cases test_fuzz_strings_races.py runs (counted by running its generators
    as CI does)."""
    seed = hh.pack_tiny_family(root / "ci-sr")
    tally = hh.Tally()
    (root / "ci-sr-case").mkdir()
    tsr.manifest_string_cases(seed, root / "ci-sr-case" / "c.tdd", ["inspect"], tally)
    tally.cases += 2 * len(tsr.HOSTILE_STRINGS)  # the path strings, unpack and verify
    tsr.checkpoint_string_cases(root / "ci-sr-ckpt", ["analyze", "pack"], tally)
    tsr.pack_race_cases(root / "ci-sr-src", root / "ci-sr-pack", tally)
    (root / "ci-sr-bundle").mkdir()
    tsr.bundle_race_cases(seed, root / "ci-sr-bundle", tally)
    return tally.cases


def write_section(table: str, ci: str, wall: float, commit: str, corpus: bool,
                  seconds: float) -> None:
    results = ROOT / "bench" / "RESULTS.md"
    text = results.read_text() if results.exists() else (
        "# Benchmark results\n\nMeasured figures of the scripts in bench/, one section per "
        "script (each owned by its author).\n")
    section = f"""## fuzz

Command (repo root, venv active):

    python bench/fuzz.py --seconds {seconds:.0f} --write

Machine: {os.cpu_count()} cores, Python {platform.python_version()}, commit {commit};
corpus {'built' if corpus else 'absent'}. Wall time {wall:.0f} s. Every case ended in a
`TdedupError` or read as valid (no IndexError, MemoryError, OverflowError, struct.error,
UnicodeDecodeError, crash or hang past 10 s); every failed `unpack` left no file.

{table}

The CI part of the suite runs the same generators on fewer seeds (all of tests/test_fuzz_*.py,
test_corrupt_exhaustive.py, test_hostile_bundles.py, test_interrupted_writes.py and
test_unpack_safety.py together: ~45 s on 2 cores, corpus built):

{ci}

The corpus row is 0 when the corpus is not built. Long runs in tests/ (`pytest -m slow`):
every single-bit flip of the tiny bundle, and 40 SIGKILLs each of pack, pack over an
existing bundle, and unpack.
"""
    start = text.find("\n## fuzz\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + section + ("" if end == -1 else text[end:])
    results.write_text(text)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
