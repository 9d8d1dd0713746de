"""Build a small, real model family for ``tdedup demo``: no downloads, no torch.

A tiny embedding + MLP regressor is trained with real gradient steps (Adam, numpy
backprop), then fine-tuned the ways teams do it, and saved in the real formats:

- ``base/``: pre-trained, ``model.safetensors`` + ``config.json``;
- ``ft-full/``: every parameter fine-tuned on a second task (SGD: embedding rows never
  looked up keep their exact bytes, everything else drifts slightly);
- ``ft-frozen/``: embedding and first two layers frozen, the rest fine-tuned;
- ``safety.safetensors``: the base weights re-saved with new metadata (new file bytes);
- ``base-f32.gguf``: the base exported to GGUF with llama.cpp-style tensor names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB, DIM, HIDDEN, SEQ = 4096, 256, 1024, 8
LAYERS = [(DIM, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, DIM)]


@dataclass(slots=True)
class DemoFamily:
    """Paths of the demo models, in the order ``analyze``/``pack`` should list them."""

    root: Path
    models: dict[str, Path]
    losses: dict[str, tuple[float, float]]  # first and last training loss per run


def _init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    params = {"embed.weight": (rng.standard_normal((VOCAB, DIM)) * 0.02).astype(np.float32)}
    for i, (fan_in, fan_out) in enumerate(LAYERS):
        params[f"layers.{i}.weight"] = (rng.standard_normal((fan_out, fan_in))
                                        / np.sqrt(fan_in)).astype(np.float32)
        params[f"layers.{i}.bias"] = np.zeros(fan_out, np.float32)
    return params


def _forward_backward(p: dict[str, np.ndarray], tokens: np.ndarray, target: np.ndarray
                      ) -> tuple[float, dict[str, np.ndarray]]:
    """Mean-squared error of the regressor and the gradient of every parameter."""
    x = p["embed.weight"][tokens].mean(axis=1)  # (B, DIM)
    acts = [x]
    for i in range(len(LAYERS)):
        z = acts[-1] @ p[f"layers.{i}.weight"].T + p[f"layers.{i}.bias"]
        acts.append(np.maximum(z, 0) if i < len(LAYERS) - 1 else z)
    err = acts[-1] - target
    loss = float((err ** 2).mean())
    grads: dict[str, np.ndarray] = {}
    g = 2 * err / err.size
    for i in reversed(range(len(LAYERS))):
        grads[f"layers.{i}.weight"] = g.T @ acts[i]
        grads[f"layers.{i}.bias"] = g.sum(axis=0)
        g = g @ p[f"layers.{i}.weight"]
        if i > 0:
            g = g * (acts[i] > 0)
    emb_grad = np.zeros_like(p["embed.weight"])
    np.add.at(emb_grad, tokens, np.repeat(g[:, None, :] / SEQ, SEQ, axis=1))
    grads["embed.weight"] = emb_grad
    return loss, grads


def _train(p: dict[str, np.ndarray], task: np.ndarray, steps: int, seed: int, *,
           adam: bool, lr: float, frozen: tuple[str, ...] = ()) -> tuple[float, float]:
    """Train in place; returns (first loss, last loss)."""
    rng = np.random.default_rng(seed)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    losses = []
    for step in range(1, steps + 1):
        # Each batch draws tokens from a small slice of the vocabulary, as real text does.
        tokens = rng.integers(0, VOCAB // 4, size=(32, SEQ))
        target = np.tanh(task[tokens].mean(axis=1))
        loss, grads = _forward_backward(p, tokens, target)
        losses.append(loss)
        for k, g in grads.items():
            if k.startswith(frozen):
                continue
            if adam:
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                mh, vh = m[k] / (1 - 0.9 ** step), v[k] / (1 - 0.999 ** step)
                p[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
            else:
                p[k] -= (lr * g).astype(np.float32)
    return losses[0], losses[-1]


def _config(name: str) -> str:
    return json.dumps({"model_type": "tdedup-demo-mlp", "name": name, "vocab_size": VOCAB,
                       "dim": DIM, "hidden": HIDDEN, "layers": len(LAYERS)}, indent=2)


def _save_folder(folder: Path, name: str, params: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(params, str(folder / "model.safetensors"), metadata={"format": "np"})
    (folder / "config.json").write_text(_config(name))
    return folder


def _save_gguf(path: Path, params: dict[str, np.ndarray]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "tdedup-demo")
    writer.add_name("tdedup demo base")
    names = {"embed.weight": "token_embd.weight"}
    for k, arr in params.items():
        i, kind = (k.split(".")[1], k.split(".")[2]) if k.startswith("layers.") else (None, None)
        writer.add_tensor(names.get(k) or f"blk.{i}.ffn.{kind}", arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_demo_family(root: str | Path, *, seed: int = 0) -> DemoFamily:
    """Train and save the demo family under ``root`` (about 15 MB per model, seconds)."""
    from safetensors.numpy import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    task_a = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    task_b = task_a + 0.3 * rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    losses = {}

    base = _init(rng)
    losses["base"] = _train(base, task_a, 60, seed + 1, adam=True, lr=1e-3)
    models = {"base": _save_folder(root / "base", "base", base)}

    full = {k: v.copy() for k, v in base.items()}
    losses["ft-full"] = _train(full, task_b, 20, seed + 2, adam=False, lr=2e-2)
    models["ft-full"] = _save_folder(root / "ft-full", "ft-full", full)
    del full

    frozen = {k: v.copy() for k, v in base.items()}
    losses["ft-frozen"] = _train(frozen, task_b, 20, seed + 3, adam=False, lr=2e-2,
                                 frozen=("embed.", "layers.0.", "layers.1."))
    models["ft-frozen"] = _save_folder(root / "ft-frozen", "ft-frozen", frozen)
    del frozen

    safety = root / "safety.safetensors"
    save_file(base, str(safety), metadata={"format": "np", "variant": "safety-reviewed"})
    models["safety"] = safety
    models["base-gguf"] = _save_gguf(root / "base-f32.gguf", base)
    return DemoFamily(root, models, losses)
