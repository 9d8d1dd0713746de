"""Benchmark the memory of a family of *models* (not state dicts): N models loaded
separately with ``AutoModel.from_pretrained`` against the same N built by
``tdedup.from_bundle`` from one loaded bundle.

    python bench/models.py [--corpus DIR] [--bundle PATH] [--device cpu|cuda]

Models: minilm/{base, dup-pkg, resaved, sharded, ft-freeze, ft-full, ft-lora-merged} of
the real-checkpoint corpus (shared/corpus/build.sh; ``--corpus`` or ``TDEDUP_CORPUS``),
packed once with default settings into ``--bundle`` (a temporary file by default).

Each side runs in a fresh subprocess, which imports torch, transformers and tdedup, notes
its RSS (the baseline, after building one model on the meta device so that the model's
code is imported), loads the N models, runs each once on one batch (so that every
weight page is really read, mapped files included), and reports:

- ``tensor_bytes``: the distinct bytes behind the models' parameters and buffers (each
  storage once: what the models hold in memory, on any device);
- ``rss_growth``: the process's RSS after minus the baseline (CPU only);
- per model, ``without sharing`` (its own tensors' bytes) and ``with sharing`` (what it
  adds to the models before it), as ``tdedup load`` prints;
- ``outputs_equal``: whether every tdedup model's output is ``torch.equal`` to the
  ``from_pretrained`` one (checked in the tdedup side against saved outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import add_corpus_option

FAMILY = ("base", "dup-pkg", "resaved", "sharded", "ft-freeze", "ft-full", "ft-lora-merged")
SENTENCES = ["Deduplicated tensors load once.", "A second, longer sentence here."]


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(side: str, bundle: str, corpus: str, device: str, outputs: str) -> dict:
    """One side, in this (fresh) process."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    import tdedup
    from tdedup.loaders.sharing import model_sharing

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folders = {n: Path(corpus) / "minilm" / n for n in FAMILY}
    batch = AutoTokenizer.from_pretrained(folders["base"])(SENTENCES, padding=True,
                                                         return_tensors="pt").to(device)
    with torch.device("meta"):  # imports the model's code (~140 MB) before the baseline
        AutoModel.from_config(AutoConfig.from_pretrained(folders["base"]))
    base_rss = rss_now()
    t0 = time.perf_counter()
    if side == "separate":
        models = {n: AutoModel.from_pretrained(p).to(device).eval() for n, p in folders.items()}
    else:
        loaded = tdedup.load(bundle, device=device)
        models = {n: tdedup.from_bundle(loaded, n) for n in FAMILY}
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = {n: m(**batch).last_hidden_state.cpu() for n, m in models.items()}
    if device == "cuda":
        torch.cuda.synchronize()
    growth = rss_now() - base_rss
    states = {n: {**dict(m.named_parameters()), **dict(m.named_buffers())}
              for n, m in models.items()}
    rows = model_sharing(states)
    equal = None
    if side == "separate":
        torch.save(out, outputs)
    else:
        ref = torch.load(outputs)
        equal = all(torch.equal(out[n], ref[n]) for n in FAMILY)
    return {"side": side, "seconds": seconds, "rss_growth": growth,
            "tensor_bytes": sum(r.added_bytes for r in rows),
            "rows": [[r.model, r.alone_bytes, r.added_bytes] for r in rows],
            "outputs_equal": equal}


def run(side: str, args, outputs: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--bundle", str(args.bundle),
           "--corpus", str(args.corpus), "--device", args.device, "--outputs", outputs]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{side} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_option(p)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child")
    p.add_argument("--outputs")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.bundle), str(args.corpus), args.device,
                               args.outputs)))
        return
    with tempfile.TemporaryDirectory(prefix="tdedup-bench-") as tmp:
        if args.bundle is None:
            import tdedup

            args.bundle = Path(tmp) / "minilm.tdd"
            tdedup.pack([f"{n}={args.corpus / 'minilm' / n}" for n in FAMILY], args.bundle)
        outputs = str(Path(tmp) / "outputs.pt")
        sep = run("separate", args, outputs)
        dd = run("tdedup", args, outputs)
    print(f"{len(FAMILY)} MiniLM models on {args.device}: from_pretrained each vs "
          "tdedup.from_bundle from one bundle")
    print(f"{'model':<16}{'without sharing':>17}{'with sharing':>14}{'saved':>11}")
    for name, alone, added in dd["rows"]:
        print(f"{name:<16}{mb(alone):>17}{mb(added):>14}{mb(alone - added):>11}")
    alone = sum(r[1] for r in dd["rows"])
    print(f"{'total':<16}{mb(alone):>17}{mb(dd['tensor_bytes']):>14}"
          f"{mb(alone - dd['tensor_bytes']):>11}")
    print(f"tensor bytes held: separate {mb(sep['tensor_bytes'])}, tdedup "
          f"{mb(dd['tensor_bytes'])} ({sep['tensor_bytes'] / dd['tensor_bytes']:.2f}x less)")
    if args.device == "cpu":
        print(f"RSS growth:        separate {mb(sep['rss_growth'])}, tdedup "
              f"{mb(dd['rss_growth'])} ({sep['rss_growth'] / dd['rss_growth']:.2f}x less)")
    print(f"load seconds:      separate {sep['seconds']:.2f}, tdedup {dd['seconds']:.2f}")
    print(f"outputs torch.equal to from_pretrained's: {dd['outputs_equal']}")


if __name__ == "__main__":
    main()
