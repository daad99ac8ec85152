"""Hostile arguments to the serving export that need no trained model (checked before loading)."""

from __future__ import annotations

import pytest

from cdp_rec.cli import main
from cdp_rec.serving.export import export_serving
from cdp_rec.serving.package import PackageError


def test_export_serving_refuses_an_out_inside_the_checkpoint_or_around_it(tmp_path, capsys):
    ck = tmp_path / "run" / "checkpoints" / "step-000000010"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text("{}")
    for out in (ck / "pkg", ck, tmp_path / "run"):
        with pytest.raises(PackageError, match=r"the package and the checkpoint .*step-000000010 must not lie "
                                               r"inside one another"):
            export_serving(ck, out, force=True)
    assert sorted(p.name for p in ck.iterdir()) == ["meta.json"]  # nothing written into the checkpoint
    assert main(["export", "--serving", "--checkpoint", str(ck), "--out", str(ck / "pkg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must not lie inside one another" in err[0]
