"""Checkpoints made by real gradient steps, for the delta codec, planner and drift tests.

A tiny torch model (an embedding, two linear layers, a LayerNorm) is trained with AdamW
on a token classification task that only ever sees a few tokens, so that the fine-tune
has what real ones have: layers that every step moves, embedding rows that only weight
decay moves, and optionally a merged LoRA. Each builder takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB, DIM, HIDDEN = 1024, 64, 256


def _model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(VOCAB, DIM),
        "norm": torch.nn.LayerNorm(DIM),
        "up": torch.nn.Linear(DIM, HIDDEN),
        "down": torch.nn.Linear(HIDDEN, 4),
    })


def _forward(m, tokens):
    import torch

    x = m["norm"](m["embed"](tokens)).mean(dim=1)
    return m["down"](torch.relu(m["up"](x)))


def train(m, steps: int, seed: int, lr: float = 1e-3, frozen: tuple[str, ...] = (),
          weight_decay: float = 0.01) -> None:
    """``steps`` AdamW steps on batches that use only the first 64 tokens."""
    import torch

    for name, p in m.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 64, (16, 8), generator=g)
        labels = tokens[:, 0] % 4
        loss = torch.nn.functional.cross_entropy(_forward(m, tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in m.parameters():
        p.requires_grad_(True)


def state(m) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in m.state_dict().items()}


def merge_lora(weights: dict[str, np.ndarray], name: str, rank: int, seed: int,
               steps: int = 5) -> dict[str, np.ndarray]:
    """``weights`` with a rank-``rank`` LoRA trained ``steps`` AdamW steps on ``name``
    (a linear weight) merged in the way peft's ``merge_and_unload`` does (W += B @ A * s)."""
    import torch

    torch.manual_seed(seed)
    w = torch.from_numpy(weights[name].copy())
    a = torch.nn.Parameter(torch.randn(rank, w.shape[1]) * 0.1)
    b = torch.nn.Parameter(torch.zeros(w.shape[0], rank))
    opt = torch.optim.AdamW([a, b], lr=1e-2)
    x = torch.randn(32, w.shape[1], generator=torch.Generator().manual_seed(seed))
    target = torch.randn(32, w.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        loss = ((x @ (w + b @ a * 2.0).T - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        merged = w + (b @ a) * 2.0
    out = dict(weights)
    out[name] = merged.numpy().copy()
    return out


def family(root: Path, dtype: str = "float32") -> dict[str, Path]:
    """Safetensors checkpoints under ``root``: ``base`` (pretrained 5 steps), ``ft`` (10
    more steps), ``ft-frozen`` (10 more, embedding and norm frozen), ``lora`` (a rank-4
    LoRA merged into ``up.weight``), ``copy`` (base again, new file)."""
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    m = _model(0)
    train(m, 5, seed=0)
    base = state(m)
    out = {}

    def save(name: str, tensors: dict[str, np.ndarray]) -> None:
        tt = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        if dtype != "float32":
            tt = {k: v.to(getattr(torch, dtype)) for k, v in tt.items()}
        out[name] = root / f"{name}.safetensors"
        save_file(tt, str(out[name]))

    save("base", base)
    save("copy", base)
    for name, frozen in (("ft", ()), ("ft-frozen", ("embed", "norm"))):
        m = _model(0)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
        train(m, 10, seed=1, frozen=frozen)
        save(name, state(m))
    save("lora", merge_lora(base, "up.weight", rank=4, seed=2))
    return out


_FAMILY: dict = {}


def shared_family(tmp_path_factory) -> dict[str, Path]:
    """:func:`family` built once per test session (modules share it; read-only)."""
    if "f32" not in _FAMILY:
        _FAMILY["f32"] = family(tmp_path_factory.mktemp("delta-family"))
    return _FAMILY["f32"]
