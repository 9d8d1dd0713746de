"""The public Python API, pinned: a name added or dropped here is a decision, not an accident."""

from __future__ import annotations

import inspect

import tdedup

PUBLIC = {
    "__version__", "TdedupError",
    "pack", "PackResult", "convert", "ConvertResult", "unpack", "UnpackResult", "verify", "VerifyResult",
    "add", "remove", "merge", "EditResult",
    "open_bundle", "Bundle",
    "load", "load_into", "LoadedBundle", "Registry",
    "from_bundle", "sentence_transformer", "pipelines", "private",
}


def test_all_is_pinned():
    assert set(tdedup.__all__) == PUBLIC
    assert len(tdedup.__all__) == len(set(tdedup.__all__))


def test_every_public_name_resolves():
    for name in tdedup.__all__:
        assert getattr(tdedup, name) is not None, name


def test_public_functions_are_typed_and_documented():
    for name in tdedup.__all__:
        obj = getattr(tdedup, name)
        if inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, name
            for p in sig.parameters.values():
                assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name})"


def test_errors_are_one_hierarchy():
    from tdedup import errors

    classes = [c for c in vars(errors).values()
               if inspect.isclass(c) and issubclass(c, Exception) and c.__module__ == errors.__name__]
    assert all(issubclass(c, tdedup.TdedupError) for c in classes)
    e = errors.IntegrityError("bad bytes", path="x.tdd", blob="ab" * 32, models=("m",),
                              part="plane 1")
    assert str(e) == "x.tdd: blob abababababababab (used by m): plane 1: bad bytes"
