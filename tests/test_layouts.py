"""Bundle layouts (spec/FORMAT.md §10.1): ``pack(layout=...)`` and ``convert``.

``serving`` keeps every self-contained blob RAW and aligned; ``compact`` compresses them;
deltas are the same in both. Both layouts restore every file byte for byte and load bit
for bit; ``convert`` re-lays a bundle without re-planning (compact -> serving -> compact
restores every file; deltas are copied byte for byte) and never clobbers its input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tdedup
from tdedup.cli.app import app
from tdedup.errors import IntegrityError, OutputExistsError, UsageError
from tdedup.format.bundle.constants import BlobEncoding
from tdedup.ops.convert import convert, layout_of

from helpers.bundle_helpers import assert_restored, flip

runner = CliRunner()


def pack(tmp: Path, sources: dict[str, Path], name: str, **kw) -> Path:
    out = tmp / name
    tdedup.pack([f"{n}={p}" for n, p in sources.items()], out, **kw)
    return out


@pytest.fixture(scope="module")
def family(bert_family) -> dict[str, Path]:
    return {k: bert_family[k] for k in ("base", "finetune", "frozen", "sharded")}


@pytest.fixture(scope="module")
def bundles(family, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("layouts")
    return {lay: pack(tmp, family, f"{lay}.tdd", layout=lay) for lay in ("compact", "serving")}


def blobs(path: Path):
    with tdedup.open_bundle(path) as b:
        return b.manifest, dict(b.manifest.blobs)


def test_serving_blobs_are_raw_and_aligned_deltas_compressed(bundles):
    man, recs = blobs(bundles["serving"])
    assert layout_of(man) == man.summary["layout"] == "serving"
    assert recs and all(r.encoding is BlobEncoding.RAW and r.offset % man.alignment == 0
                        for r in recs.values() if r.base is None)
    cman, crecs = blobs(bundles["compact"])
    assert layout_of(cman) == cman.summary["layout"] == "compact"
    assert any(r.encoding is not BlobEncoding.RAW for r in crecs.values() if r.base is None)
    # the same plan: same blobs, the same deltas stored the same way
    assert recs.keys() == crecs.keys()
    for h, r in recs.items():
        if r.base is not None:
            assert (r.base, r.encoding, r.checksum) == (crecs[h].base, crecs[h].encoding,
                                                        crecs[h].checksum)


@pytest.mark.parametrize("layout", ["compact", "serving"])
def test_both_layouts_restore_and_load(bundles, family, tmp_path, layout):
    tdedup.unpack(bundles[layout], tmp_path / "out")
    assert_restored(family, tmp_path / "out")
    pytest.importorskip("torch")
    from test_load import assert_matches_safetensors

    loaded = tdedup.load(bundles[layout], device="cpu")
    for name, folder in family.items():
        for f in sorted(folder.glob("*.safetensors")):
            assert_matches_safetensors(loaded[name], f)


def test_convert_round_trip(bundles, family, tmp_path):
    serving = convert(bundles["compact"], tmp_path / "s.tdd", "serving")
    assert serving.layout == "serving" and serving.decoded > 0
    back = convert(serving.path, tmp_path / "c.tdd", "compact")
    assert back.encoded > 0
    for path in (serving.path, back.path):
        tdedup.verify(path)
        dest = tmp_path / path.stem
        tdedup.unpack(path, dest)
        assert_restored(family, dest)
    sman, srecs = blobs(serving.path)
    _, orig = blobs(bundles["compact"])
    _, again = blobs(back.path)
    assert sman.summary["layout"] == "serving"
    assert all(r.encoding is BlobEncoding.RAW for r in srecs.values() if r.base is None)
    assert srecs.keys() == orig.keys() == again.keys()
    for h, r in orig.items():
        if r.base is not None:  # deltas copied byte for byte, both ways
            assert srecs[h].checksum == again[h].checksum == r.checksum
            assert srecs[h].encoding is again[h].encoding is r.encoding


def test_convert_refuses_its_input_and_existing_outputs(bundles, tmp_path):
    src = tmp_path / "b.tdd"
    src.write_bytes(bundles["compact"].read_bytes())
    with pytest.raises(UsageError):
        convert(src, src, "serving", force=True)
    (tmp_path / "link.tdd").symlink_to(src)
    with pytest.raises(UsageError):
        convert(src, tmp_path / "link.tdd", "serving", force=True)
    out = tmp_path / "out.tdd"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        convert(src, out, "serving")
    assert out.read_bytes() == b"keep me"
    with pytest.raises(UsageError):
        convert(src, tmp_path / "x.tdd", "fast")
    convert(src, out, "serving", force=True)
    assert layout_of(blobs(out)[0]) == "serving"


def test_convert_refuses_a_damaged_bundle_and_writes_nothing(bundles, tmp_path):
    src = tmp_path / "b.tdd"
    src.write_bytes(bundles["compact"].read_bytes())
    _, recs = blobs(src)
    victim = max((r for r in recs.values() if r.encoding is not BlobEncoding.RAW
                  and r.base is None), key=lambda r: r.stored_length)
    flip(src, victim.offset + victim.stored_length // 2)
    with pytest.raises(IntegrityError):
        convert(src, tmp_path / "out.tdd", "serving")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tdd"]


def test_cli_pack_convert_inspect(family, tmp_path):
    out = tmp_path / "s.tdd"
    r = runner.invoke(app, ["pack", "--layout", "serving", "-q", "-o", str(out),
                            *[f"{n}={p}" for n, p in family.items()]])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layout"] == "serving"
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "layout serving" in r.stdout, r.output
    back = tmp_path / "c.tdd"
    r = runner.invoke(app, ["convert", str(out), "--layout", "compact", "-o", str(back), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(runner.invoke(app, ["inspect", "--json", str(back)]).stdout
                      )["layout"] == "compact"
    r = runner.invoke(app, ["convert", str(out), "--layout", "compact", "-o", str(back), "-q"])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["convert", str(out), "--layout", "compact", "-o", str(out), "-q"])
    assert r.exit_code == 2
