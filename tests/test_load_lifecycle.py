"""Loaded models over time, on the CPU with tiny factory models: tensors read by the keys
a load gives them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tdedup  # noqa: E402
from tdedup.errors import AmbiguousNameError, ModelNotFoundError  # noqa: E402


def pack(out: Path, sources: dict[str, Path], **kw) -> Path:
    tdedup.pack([f"{n}={p}" for n, p in sources.items()], out, **kw)
    return out


# -- tensors by key -------------------------------------------------------------------

def test_read_tensor_takes_load_keys_and_refuses_an_ambiguous_name(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    for i, sub in enumerate(("", "te1", "te2")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4,), float(i)), f"only{i}": torch.zeros(2)},
                  str(folder / sub / "model.safetensors"))
    bundle = pack(tmp_path / "b.tdd", {"m": folder})
    loaded = tdedup.load(bundle, device="cpu")
    with tdedup.open_bundle(bundle) as b:
        for key, t in loaded["m"].items():  # every key load gives, the same bytes
            assert bytes(memoryview(b.read_tensor("m", key))) == \
                t.contiguous().view(torch.uint8).numpy().tobytes(), key
        assert np.frombuffer(b.read_tensor("m", "te2/w"), np.float32).tolist() == [2.0] * 4
        assert np.frombuffer(b.read_tensor("m", "w"), np.float32).tolist() == [0.0] * 4
        assert len(b.read_tensor("m", "only1")) == 8  # a bare name in one file only
    # No root file: the bare name is in two files.
    shutil.rmtree(tmp_path / "m2", ignore_errors=True)
    shutil.copytree(folder, tmp_path / "m2")
    (tmp_path / "m2" / "model.safetensors").unlink()
    bundle2 = pack(tmp_path / "b2.tdd", {"m2": tmp_path / "m2"})
    with tdedup.open_bundle(bundle2) as b:
        with pytest.raises(AmbiguousNameError, match="2 tensors named 'w'") as e:
            b.read_tensor("m2", "w")
        assert e.value.candidates == ("te1/w", "te2/w")
        assert "te2/w" in str(e.value) and "read_tensor" in e.value.hint
        with pytest.raises(ModelNotFoundError, match="no tensor"):
            b.read_tensor("m2", "te3/w")


def test_read_tensor_of_two_gguf_files_in_one_folder(tmp_path, gguf_family):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("f32", "q8_0"):
        shutil.copy(gguf_family[name], folder / f"{name}.gguf")
    bundle = pack(tmp_path / "b.tdd", {"two": folder})
    import gguf

    want = {t.name: t.data.tobytes() for t in gguf.GGUFReader(folder / "q8_0.gguf").tensors}
    with tdedup.open_bundle(bundle) as b:
        got = b.read_tensor("two", "q8_0.gguf:blk.0.attn_q.weight")
        assert bytes(memoryview(got)) == want["blk.0.attn_q.weight"]
        with pytest.raises(AmbiguousNameError) as e:
            b.read_tensor("two", "blk.0.attn_q.weight")
        assert set(e.value.candidates) == {"f32.gguf:blk.0.attn_q.weight",
                                           "q8_0.gguf:blk.0.attn_q.weight"}
