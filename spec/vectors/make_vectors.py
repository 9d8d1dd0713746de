"""Regenerate the format test vectors: one tiny bundle per transform (§4.6-4.8, 1.1), one
of rotated byte planes (§4.3.2, 1.2) and one holding each delta encoding (§4.4).

    python spec/vectors/make_vectors.py [NAME ...]   (repo root, tdedup importable;
                                                    NAMEs: only those, the rest kept)

Each ``<name>.tdd`` packs two or three tiny models whose later tensors are the named
transform of the first model's; ``expected.json`` records, per vector, the SHA-256 of every
original file (what unpack must give back), the transform chains its derived blobs name,
and the BLAKE3 hash of each derived blob's decoded bytes; for ``rotated_n``, the rotation
of each ``ROTATEDN_BYTEPLANE_ZSTD`` blob by its hash; for ``deltas``, the encoding of
each delta blob by its hash. A second implementation checks
itself by unpacking each bundle and comparing. Inputs are seeded, so a rerun rewrites the
same bytes (the bundles too, while the writer does not change).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

import tdedup
from tdedup.format.bundle.constants import BlobEncoding
from tdedup.format.codecs.byteplane import rotation_prefix
from tdedup.format.codecs.derived import parse_derived
from tdedup.format.codecs.transforms import from_f32, quantize

HERE = Path(__file__).parent
HF_Q = "model.layers.0.self_attn.q_proj.weight"


def _x(shape, seed=0, scale=0.05) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _gguf(path: Path, tensors: dict, arch: str = "bert", heads: int | None = None) -> None:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    if heads:
        w.add_head_count(heads)
        w.add_head_count_kv(heads)
    for name, (data, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _quant(x: np.ndarray, name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    q = quantize(x, name, x.shape[-1]).reshape(x.shape[0], -1)
    return q, gguf.GGMLQuantizationType[name]


def build(d: Path) -> dict[str, list[Path]]:
    """Vector name -> the model files to pack, in order (the base first)."""
    out: dict[str, list[Path]] = {}
    x = _x((2, 256))
    save_file({"w": x}, d / "f32.safetensors")
    for t, arr in (("f16", x.astype(np.float16)),):
        save_file({"w": arr}, d / f"{t}.safetensors")
    out["cast_f16"] = [d / "f32.safetensors", d / "f16.safetensors"]
    import torch  # the BF16 cast as torch writes it
    from safetensors.torch import save_file as save_torch
    save_torch({"w": torch.from_numpy(x).bfloat16()}, d / "bf16.safetensors")
    out["cast_bf16"] = [d / "f32.safetensors", d / "bf16.safetensors"]
    exact = np.round(x * 64).astype(np.float16).astype(np.float32)  # F16-exact values
    save_file({"w": exact.astype(np.float16)}, d / "exact-f16.safetensors")
    save_file({"w": exact}, d / "exact-f32.safetensors")
    out["cast_f32"] = [d / "exact-f16.safetensors", d / "exact-f32.safetensors"]
    name = "token_embd.weight"
    _gguf(d / "base.gguf", {name: (x, None)})
    for q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        _gguf(d / f"{q.lower()}.gguf", {name: _quant(x, q)})
        out[f"quantize_{q.lower()}"] = [d / "base.gguf", d / f"{q.lower()}.gguf"]
    q41 = _quant(x, "Q4_1")
    deq = gguf.quants.dequantize(q41[0], q41[1]).astype(np.float32)
    _gguf(d / "deq-f16.gguf", {name: (deq.astype(np.float16), None)})
    _gguf(d / "req-q8_0.gguf", {name: (gguf.quants.quantize(deq, gguf.GGMLQuantizationType.Q8_0),
                                       gguf.GGMLQuantizationType.Q8_0)})
    out["dequantize_f16"] = [d / "q4_1.gguf", d / "deq-f16.gguf"]
    out["chain_dequantize_quantize"] = [d / "q4_1.gguf", d / "req-q8_0.gguf"]
    y = _x((16, 64), seed=1)
    save_file({"w": y}, d / "t-base.safetensors")
    save_file({"w": np.ascontiguousarray(y.T)}, d / "t-transposed.safetensors")
    out["transpose"] = [d / "t-base.safetensors", d / "t-transposed.safetensors"]
    q = _x((64, 32), seed=2)
    save_file({HF_Q: q}, d / "llama-hf.safetensors")
    perm = q.reshape(4, 2, 8, 32).swapaxes(1, 2).reshape(64, 32)  # convert_hf_to_gguf permute
    _gguf(d / "llama.gguf", {"blk.0.attn_q.weight": (np.ascontiguousarray(perm), None)},
          arch="llama", heads=4)
    out["permute_qk"] = [d / "llama-hf.safetensors", d / "llama.gguf"]
    # Trained-like F32 / BF16 (|w| < 2: rotated by 3) and F16 (by 1), and positive
    # log-normal F32 (by 4).
    g = _x((64, 512), seed=3)
    pos = np.exp(_x((64, 512), seed=3, scale=0.5))
    save_torch({"f32": torch.from_numpy(g), "bf16": torch.from_numpy(g).bfloat16(),
                "f16": torch.from_numpy(g).half(), "pos": torch.from_numpy(pos)},
               d / "rotated.safetensors")
    out["rotated_n"] = [d / "rotated.safetensors"]
    # Q8_0 on exact halves: every block's scale is 1 (|max| = 127), so each value lands
    # on k + 0.5 and roundf (away from zero) differs from round-half-even.
    ties = (np.arange(512, dtype=np.float32) % 251 - 125.5).reshape(2, 256)
    ties[:, ::32] = 127.0
    _gguf(d / "ties-f32.gguf", {name: (ties, None)})
    _gguf(d / "ties-q8_0.gguf", {name: _quant(ties, "Q8_0")})
    out["quantize_q8_0_ties"] = [d / "ties-f32.gguf", d / "ties-q8_0.gguf"]
    out["deltas"] = _delta_family(d)
    # NaNs (quiet and signalling, with payloads), infinities, subnormals and zeros of
    # both signs: their cast bits are §4.8's rules (the reference functions' output), and
    # Q8_0 blocks holding a NaN or infinity predict zeros (the residual carries them).
    sp = _x((2, 256), seed=4)
    bits = sp.view(np.uint32)
    bits[0, :16] = [0x7FC00000, 0xFFC00001, 0x7FA00000, 0x7F800001, 0xFF802000,
                    0x7FFFFFFF, 0x7F800000, 0xFF800000, 0x00000001, 0x807FFFFF,
                    0x00400000, 0x80000000, 0x00000000, 0x477FF000, 0x47800000, 0x33000000]
    bits[1, 40] = 0x7FC00000  # one NaN in a later Q8_0 block
    save_file({"w": sp}, d / "sp-f32.safetensors")
    save_file({"w": from_f32(sp, "F16").view(np.float16).reshape(sp.shape)},
              d / "sp-f16.safetensors")
    torch_bf16 = torch.from_numpy(from_f32(sp, "BF16").view(np.int16).reshape(sp.shape).copy())
    save_torch({"w": torch_bf16.view(torch.bfloat16)}, d / "sp-bf16.safetensors")
    out["cast_specials"] = [d / "sp-f32.safetensors", d / "sp-f16.safetensors",
                            d / "sp-bf16.safetensors"]
    _gguf(d / "sp-f32.gguf", {name: (sp, None)})
    with np.errstate(all="ignore"):  # gguf-py's own bytes for the non-finite blocks
        q = gguf.quants.quantize(sp, gguf.GGMLQuantizationType.Q8_0)
    _gguf(d / "sp-q8_0.gguf", {name: (q, gguf.GGMLQuantizationType.Q8_0)})
    out["quantize_q8_0_specials"] = [d / "sp-f32.gguf", d / "sp-q8_0.gguf"]
    return out


def _delta_family(d: Path) -> list[Path]:
    """One F32 base and five variants that the writer stores as each delta encoding
    (§4.4): XOR (low bits flipped), SUB (patterns moved up by 0-3), ZIGZAG_SUB (noise),
    DECAY_SUB (multiplied by c seven times in binary32) and LOWRANK_SUB (a rank-2 update
    added in binary64)."""
    rng = np.random.default_rng(7)
    w = _x((64, 256), seed=7)
    bits = w.view(np.uint32)
    decayed = w.copy()
    for _ in range(7):
        decayed = (decayed * np.float32(1 - 1e-5)).astype(np.float32)
    u, v = rng.standard_normal((64, 2)) * 0.01, rng.standard_normal((2, 256)) * 0.01
    variants = {
        "base": w,
        "xor": (bits ^ (np.uint32(1) << rng.integers(0, 3, bits.shape).astype(np.uint32))
                ).view(np.float32),
        "sub": (bits + rng.integers(0, 4, bits.shape, dtype=np.uint32)).view(np.float32),
        "zigzag": w + (rng.standard_normal(w.shape) * 1e-6).astype(np.float32),
        "decay": decayed,
        "lowrank": (w.astype(np.float64) + u @ v).astype(np.float32),
    }
    files = []
    for n, a in variants.items():
        save_file({"w": np.ascontiguousarray(a, np.float32)}, d / f"delta-{n}.safetensors")
        files.append(d / f"delta-{n}.safetensors")
    return files


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main() -> None:
    only = set(sys.argv[1:])
    path = HERE / "expected.json"
    expected = json.loads(path.read_text()) if only and path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, files in build(Path(tmp)).items():
            if only and name not in only:
                continue
            bundle = HERE / f"{name}.tdd"
            args = [f"m{i}={p}" for i, p in enumerate(files)]
            tdedup.pack(args, bundle)
            derived, rotations, deltas = {}, {}, {}
            with tdedup.open_bundle(bundle) as b:
                for rec in b.manifest.blobs.values():
                    if 16 <= rec.encoding <= 20:
                        deltas[rec.hash] = int(rec.encoding)
                    if rec.encoding is BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD:
                        chain = parse_derived(b.stored_bytes(rec))[0]
                        derived[rec.hash] = [t.to_json() for t in chain]
                    if rec.encoding is BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD:
                        rotations[rec.hash] = rotation_prefix(b.stored_bytes(rec))
            entry = {"files": {f"m{i}/{p.name}": _sha(p) for i, p in enumerate(files)}}
            if name == "deltas":
                if sorted(deltas.values()) != [16, 17, 18, 19, 20]:
                    sys.exit(f"{name}: wanted one blob of each delta encoding, got {deltas}")
                entry["deltas"] = deltas
            elif name == "rotated_n":
                if len(set(rotations.values())) < 2:
                    sys.exit(f"{name}: wanted two rotations or more, got {rotations}")
                entry["rotations"] = rotations
            elif not derived:
                sys.exit(f"{name}: no derived blob was planned")
            else:
                entry["derived"] = derived
            expected[name] = entry
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(expected)} vectors to {HERE}")


if __name__ == "__main__":
    main()
