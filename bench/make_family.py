"""Build a small family of real transformers checkpoints for the load benchmarks, where
the real-checkpoint corpus is absent (a GPU machine without network, bench/gpu.sh).

    python bench/make_family.py OUT [--mb 160] [--steps 3] [--device auto]

Writes ``OUT/{base, dup-pkg, resaved, ft-freeze, ft-full, ft-lora-merged}/`` with
``save_pretrained`` (model.safetensors + config.json), the same relationships as the
corpus's MiniLM family:

- ``base``: a BERT masked-LM (``BertConfig`` sized to about ``--mb`` MB of F32 tensors,
  seeded), as initialised;
- ``dup-pkg``: a byte-identical copy of base's folder;
- ``resaved``: base loaded with ``from_pretrained`` and saved again;
- ``ft-full``: ``--steps`` real AdamW steps (lr 1e-4, weight decay 0.01) of masked-LM
  loss on random tokens, every parameter trained (rows of unseen tokens only decay);
- ``ft-freeze``: the same, embeddings and the lower half of the layers frozen;
- ``ft-lora-merged``: a rank-8 LoRA on every query/value projection
  (``torch.nn.utils.parametrize``), trained ``--steps`` steps, then merged into the weights.

Prints one JSON line: the model folders and their tensor bytes. A second run with the
same arguments reuses a complete family (``OUT/FAMILY.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

FAMILY = ("base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged")


def config_for(mb: float):
    """A BertConfig with about ``mb`` MB of F32 parameters."""
    from transformers import BertConfig

    hidden, vocab = (512, 30522) if mb >= 80 else (256, 8192)
    per_layer = 12 * hidden * hidden + 13 * hidden
    fixed = (vocab + 512 + 2) * hidden + hidden * hidden + vocab
    layers = max(1, round((mb * 1e6 / 4 - fixed) / per_layer))
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                      max_position_embeddings=512)


def train(model, steps: int, device, seed: int, params=None) -> None:
    """``steps`` AdamW steps of masked-LM loss on random tokens (a fixed-seed batch)."""
    import torch

    model.to(device).train()
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    for _ in range(steps):
        # Half the vocabulary never appears: those embedding rows only decay.
        ids = torch.randint(0, vocab // 2, (8, 64), generator=g).to(device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval().to("cpu")


class LoRA:
    """A parametrization ``W + scale * B @ A`` (rank ``r``), trained, then merged."""

    @staticmethod
    def module(weight, r: int, seed: int):
        import torch

        class _LoRA(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                g = torch.Generator().manual_seed(seed)
                out_f, in_f = weight.shape
                self.a = torch.nn.Parameter(torch.randn(r, in_f, generator=g) * 0.01)
                self.b = torch.nn.Parameter(torch.randn(out_f, r, generator=g) * 0.01)

            def forward(self, w):
                return w + 2.0 * (self.b @ self.a)

        return _LoRA()


def build(out: Path, mb: float, steps: int, device) -> dict:
    import torch
    from torch.nn.utils import parametrize
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    cfg = config_for(mb)
    base = BertForMaskedLM(cfg)
    base.save_pretrained(out / "base")
    shutil.copytree(out / "base", out / "dup-pkg")
    BertForMaskedLM.from_pretrained(out / "base").save_pretrained(out / "resaved")

    full = BertForMaskedLM.from_pretrained(out / "base")
    train(full, steps, device, seed=1)
    full.save_pretrained(out / "ft-full")

    frozen = BertForMaskedLM.from_pretrained(out / "base")
    keep = cfg.num_hidden_layers // 2
    for name, p in frozen.named_parameters():
        if "embeddings" in name or any(f"layer.{i}." in name for i in range(keep)):
            p.requires_grad_(False)
    train(frozen, steps, device, seed=1)
    frozen.save_pretrained(out / "ft-freeze")

    lora = BertForMaskedLM.from_pretrained(out / "base")
    for p in lora.parameters():
        p.requires_grad_(False)
    adapters = []
    for i, layer in enumerate(lora.bert.encoder.layer):
        for j, lin in enumerate((layer.attention.self.query, layer.attention.self.value)):
            m = LoRA.module(lin.weight, 8, seed=100 + 2 * i + j)
            parametrize.register_parametrization(lin, "weight", m)
            adapters += [m.a, m.b]
    train(lora, steps, device, seed=2, params=adapters)
    for layer in lora.bert.encoder.layer:
        for lin in (layer.attention.self.query, layer.attention.self.value):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    lora.save_pretrained(out / "ft-lora-merged")
    sizes = {m: sum(f.stat().st_size for f in (out / m).glob("*.safetensors"))
             for m in FAMILY}
    return {"models": {m: str(out / m) for m in FAMILY}, "bytes": sizes,
            "config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                       "vocab": cfg.vocab_size}, "mb": mb, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mb", type=float, default=160.0, help="F32 tensor MB per model")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto", help="where to train: auto, cpu, cuda")
    args = ap.parse_args()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    stamp = args.out / "FAMILY.json"
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        if done.get("mb") == args.mb and done.get("steps") == args.steps:
            print(json.dumps(done))
            return
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    info = build(tmp, args.mb, args.steps, device)
    tmp.rename(args.out)  # complete or absent
    info["models"] = {m: str(args.out / m) for m in FAMILY}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["device"] = device
    stamp.write_text(json.dumps(info))
    print(json.dumps(info))


if __name__ == "__main__":
    sys.exit(main())
