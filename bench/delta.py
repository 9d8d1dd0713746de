"""Base-plus-delta on the corpus MiniLM family: sizes against the two baselines, entropy
limits of the residuals, and encode/decode throughput of the delta codecs.

    python bench/delta.py [--corpus DIR] [--level N] [--threads 2] [--repeat 3]

Family: base, dup-pkg, resaved, ft-freeze, ft-full, ft-lora-merged (tensor payloads only;
the bundle adds the non-tensor files and the manifest, ~0.6 MB). Sizes:

- (a) every distinct tensor in byte planes (the project's ``BYTEPLANE_ZSTD`` at ``--level``);
- (b) every distinct tensor XORed with the first model's same-name tensor, in byte planes
  (same codec); ``(b*)`` the same with the residual zstd settings our deltas use;
- ours: per distinct tensor the smaller of (a)'s blob and the planner's delta.

Entropy limits (what a byte-plane coder could reach on the same residuals): order-0 entropy
of every stored plane, and the entropy of each plane given a context the decoder knows
(the base's exponent byte for F32 residuals, the plane above for self-contained floats).

Throughput: logical bytes (the six models' tensor bytes, duplicates included) per second
of planning + encoding every distinct tensor as the writer does (self-contained plus the
planned delta, keep the smaller) on ``--threads`` threads, and of decoding them all.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tdedup.analyzers.delta_planning import plan_deltas, plane_width
from tdedup.analyzers.tensor_bytes import TensorBytes
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.format import codecs
from tdedup.format.codecs import byteplane
from tdedup.format.bundle.constants import BlobEncoding as E
from tdedup.format.codecs.delta import decode_delta, planes_compress, sub_residual
from tdedup.format.codecs.delta_encode import encode_delta
from common import add_corpus_option

FAMILY = ["base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged"]


def entropy_bits(counts: np.ndarray) -> float:
    """Total bits of an order-0 code for these symbol counts."""
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


def plane_bits(planes: np.ndarray, context: np.ndarray | None = None) -> tuple[float, float]:
    """(order-0 bits, bits given ``context`` per element) summed over the columns of the
    (n, w) uint8 ``planes``; without a context, each plane is conditioned on the one above."""
    h0 = hc = 0.0
    w = planes.shape[1]
    for j in range(w):
        p = planes[:, j]
        h0 += entropy_bits(np.bincount(p, minlength=256))
        ctx = context if context is not None else (planes[:, j + 1] if j + 1 < w else None)
        if ctx is None:
            hc += entropy_bits(np.bincount(p, minlength=256))
            continue
        joint = np.bincount(ctx.astype(np.int64) * 256 + p, minlength=256 * 256)
        hc += sum(entropy_bits(row) for row in joint.reshape(256, 256) if row.any())
    return h0, hc


def residual_planes(enc: E, data, base, width: int) -> np.ndarray | None:
    """The residual our delta stores, as (n, w) planes (None for predicted encodings,
    whose residual needs the prediction: measured from the stored blob instead)."""
    if enc is E.XOR_BYTEPLANE_ZSTD:
        return np.bitwise_xor(data, base).reshape(-1, width)
    if enc in (E.SUB_BYTEPLANE_ZSTD, E.ZIGZAG_SUB_BYTEPLANE_ZSTD):
        res = sub_residual(data, base, width, enc is E.ZIGZAG_SUB_BYTEPLANE_ZSTD)
        return res.view(np.uint8).reshape(-1, width)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_corpus_option(ap)
    ap.add_argument("--level", type=int, default=codecs.DEFAULT_LEVEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = args.corpus / "minilm"
    if not (args.corpus / "MANIFEST.sha256").is_file():
        print(f"corpus not built at {args.corpus} (run shared/corpus/build.sh)", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    scanned = hash_models(index_models([f"{n}={root / n}" for n in FAMILY]))
    t_hash = time.perf_counter() - t0
    logical = scanned.tensor_bytes
    firsts = scanned.first_occurrences()
    plan_s = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        plan = plan_deltas(scanned)
        plan_s.append(time.perf_counter() - t0)
    choices = plan.choices
    first_model = {h.record.name: h for h in scanned.hashed[FAMILY[0]]}
    level = args.level

    sizes = defaultdict(int)
    by_enc = defaultdict(lambda: [0, 0, 0])  # blobs, decoded bytes, stored bytes
    by_model = defaultdict(lambda: [0, 0])  # ours stored, (a) stored
    ent = defaultdict(float)  # bits
    stored_blobs: dict = {}
    with TensorBytes(scanned) as read:
        for key, h in firsts.items():
            data, w = read(h), plane_width(h)
            own = byteplane.byteplane_compress(data, w, level)
            sizes["a"] += len(own)
            ref = first_model.get(h.record.name)
            if ref is not None and ref.key != key and ref.record.length == key[1]:
                x = np.bitwise_xor(data, read(ref))
                sizes["b"] += len(byteplane.byteplane_compress(x, w, level))
                sizes["b*"] += len(planes_compress(x, w, level))
            else:
                sizes["b"] += len(own)
                sizes["b*"] += len(own)
            c = choices.get(key)
            enc, blob = E.BYTEPLANE_ZSTD, own
            if c is not None:
                base = read(firsts[c.base])
                delta = encode_delta(c.encoding, data, base, width=c.width, level=level,
                                     shape=c.shape)
                if len(delta) < len(own):
                    enc, blob = c.encoding, delta
            sizes["ours"] += len(blob)
            stored_blobs[key] = (enc, blob)
            by_enc[enc.name][0] += 1
            by_enc[enc.name][1] += key[1]
            by_enc[enc.name][2] += len(blob)
            by_model[h.record.model][0] += len(blob)
            by_model[h.record.model][1] += len(own)
            # entropy of what is stored
            if enc is E.BYTEPLANE_ZSTD:
                h0, hc = plane_bits(data.reshape(-1, w))
                ctx_kind = "self"
            else:
                planes = residual_planes(enc, data, base, c.width)
                if planes is None:  # predicted: the residual frames are the blob's tail
                    h0 = hc = 8.0 * len(blob)
                    ctx_kind = "predicted"
                else:
                    ctx = (base.view(np.uint32) >> 23).astype(np.uint8) if c.width == 4 \
                        and h.record.dtype == "F32" else None
                    h0, hc = plane_bits(planes, ctx)
                    if ctx is None:
                        hc = h0
                    ctx_kind = "delta"
            ent[f"{ctx_kind}_h0"] += h0
            ent[f"{ctx_kind}_hc"] += hc
            ent[f"{ctx_kind}_stored"] += 8.0 * len(blob)

        def enc_job(key):
            h = firsts[key]
            data, w = read(h), plane_width(h)
            own = byteplane.byteplane_compress(data, w, level)
            c = choices.get(key)
            if c is not None:
                d = encode_delta(c.encoding, data, read(firsts[c.base]), width=c.width,
                                 level=level, shape=c.shape)
                if len(d) < len(own):
                    return len(d)
            return len(own)

        def dec_job(key):
            enc, blob = stored_blobs[key]
            n = key[1]
            if enc.is_delta:
                base = read(firsts[choices[key].base])
                return len(decode_delta(enc, blob, n, base))
            return len(codecs.decode(enc, blob, n))

        keys = list(firsts)
        delta_keys = [k for k in keys if stored_blobs[k][0].is_delta]
        timings = defaultdict(list)
        with ThreadPoolExecutor(args.threads) as pool:
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                list(pool.map(enc_job, keys))
                timings["encode"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(pool.map(dec_job, keys))
                timings["decode"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(pool.map(dec_job, delta_keys))
                timings["decode_deltas"].append(time.perf_counter() - t0)
            per_enc = defaultdict(list)
            for k in delta_keys:
                enc, blob = stored_blobs[k]
                c = choices[k]
                data, base = read(firsts[k]), read(firsts[c.base])
                t0 = time.perf_counter()
                encode_delta(enc, data, base, width=c.width, level=level, shape=c.shape)
                t1 = time.perf_counter()
                decode_delta(enc, blob, k[1], base)
                t2 = time.perf_counter()
                per_enc[enc.name].append((k[1], t1 - t0, t2 - t1))

    med = {k: float(np.median(v)) for k, v in timings.items()}
    fastest = {k: float(np.min(v)) for k, v in timings.items()}
    plan_t, plan_best = float(np.median(plan_s)), float(np.min(plan_s))
    delta_bytes = sum(k[1] for k in delta_keys)
    print(f"family: {len(FAMILY)} models, {logical:,} logical tensor bytes, "
          f"{sum(k[1] for k in firsts):,} distinct; zstd level {level}; "
          f"{args.threads} threads; median of {args.repeat}")
    print(f"hashing {t_hash:.2f} s (reference), planning {plan_t:.3f} s; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("\n| size | bytes | ours smaller by |\n| --- | ---: | ---: |")
    for k, label in (("a", "(a) distinct tensors, byte-plane zstd"),
                     ("b", "(b) XOR vs first model, byte-plane zstd"),
                     ("b*", "(b*) = (b) with our residual zstd settings"),
                     ("ours", "ours: planned deltas, else (a)'s blob")):
        print(f"| {label} | {sizes[k]:,} | {sizes[k] / sizes['ours']:.4f}x |")
    print("\n| stored as | blobs | decoded bytes | stored bytes |\n| --- | ---: | ---: | ---: |")
    for name, (n, dec, st) in sorted(by_enc.items()):
        print(f"| {name} | {n} | {dec:,} | {st:,} |")
    print("\n| first stored by | ours | (a) |\n| --- | ---: | ---: |")
    for m in FAMILY:
        if m in by_model:
            print(f"| {m} | {by_model[m][0]:,} | {by_model[m][1]:,} |")
    print("\n| entropy (bytes) | stored | order-0 per plane | given context |"
          "\n| --- | ---: | ---: | ---: |")
    tot = [0.0, 0.0, 0.0]
    for kind, ctx in (("self", "plane above"), ("delta", "base exponent (F32)"),
                      ("predicted", "(stored: header + factors + residual)")):
        row = [ent[f"{kind}_stored"] / 8, ent[f"{kind}_h0"] / 8, ent[f"{kind}_hc"] / 8]
        tot = [t + r for t, r in zip(tot, row)]
        print(f"| {kind} blobs, context {ctx} | {row[0]:,.0f} | {row[1]:,.0f} | {row[2]:,.0f} |")
    print(f"| total | {tot[0]:,.0f} | {tot[1]:,.0f} | {tot[2]:,.0f} |")
    best = min(sizes["a"], sizes["b"])
    print(f"\nlimit of byte-plane coding: best baseline / order-0 total = {best / tot[1]:.4f}x, "
          f"/ context total = {best / tot[2]:.4f}x (ours {best / sizes['ours']:.4f}x)")
    print("\n| throughput | seconds (median) | GB/s (median) | GB/s (best) |"
          "\n| --- | ---: | ---: | ---: |")
    rows = (("plan + encode all distinct (logical bytes)", plan_t + med["encode"],
             plan_best + fastest["encode"], logical),
            ("decode all distinct (logical bytes)", med["decode"], fastest["decode"], logical),
            ("decode delta blobs only (their decoded bytes)", med["decode_deltas"],
             fastest["decode_deltas"], delta_bytes))
    for label, t_med, t_best, n in rows:
        print(f"| {label} | {t_med:.3f} | {n / t_med / 1e9:.2f} | {n / t_best / 1e9:.2f} |")
    print("\n| encoding, one thread | blobs | decoded bytes | encode GB/s | decode GB/s |"
          "\n| --- | ---: | ---: | ---: | ---: |")
    for name, rows in sorted(per_enc.items()):
        n = sum(r[0] for r in rows)
        print(f"| {name} | {len(rows)} | {n:,} | {n / sum(r[1] for r in rows) / 1e9:.2f} | "
              f"{n / sum(r[2] for r in rows) / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
