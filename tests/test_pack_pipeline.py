"""pack runs the delta planner on its own thread and encodes each decision as it comes
(issue 15): the bundle must not depend on how the decisions arrive, and a planner that
fails must fail the pack with nothing left behind."""

from __future__ import annotations

import pytest

import tdedup
from tdedup.errors import InputError
from tdedup.ops import pack as pack_module


def _family(bert_family) -> list[str]:
    return [f"{k}={bert_family[k]}" for k in ("base", "finetune", "frozen", "resaved")]


def test_streamed_and_batched_decisions_give_the_same_bundle(tmp_path, bert_family,
                                                            monkeypatch):
    streamed = tdedup.pack(_family(bert_family), tmp_path / "streamed.tdd")
    assert streamed.encodings.keys() - {"byteplane_zstd", "zstd", "raw"}  # deltas planned
    real = pack_module._plan_deltas

    def batched(scanned, delta, decided=None):  # a planner that streams nothing
        return real(scanned, delta)

    monkeypatch.setattr(pack_module, "_plan_deltas", batched)
    tdedup.pack(_family(bert_family), tmp_path / "batched.tdd")
    assert (tmp_path / "streamed.tdd").read_bytes() == (tmp_path / "batched.tdd").read_bytes()


def test_a_failing_planner_fails_the_pack_and_leaves_no_bundle(tmp_path, bert_family,
                                                              monkeypatch):
    real = pack_module._plan_deltas
    told = []

    def failing(scanned, delta, decided=None):
        def tell(key, choice):
            told.append(key)
            decided(key, choice)
            if len(told) == 5:
                raise InputError("file shrank while reading", path="x.safetensors")
        return real(scanned, delta, tell)

    monkeypatch.setattr(pack_module, "_plan_deltas", failing)
    with pytest.raises(InputError, match="shrank"):
        tdedup.pack(_family(bert_family), tmp_path / "out.tdd")
    assert len(told) == 5
    assert list(tmp_path.iterdir()) == []
