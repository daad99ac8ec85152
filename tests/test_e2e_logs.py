"""A log taken from import to serving: a package trained on one remapped import refuses rows
numbered by another import's dense-id mapping (README "Bring your own logs", "Serving").

A remapped import (the default) numbers each column's distinct ids 0..n-1, so the same
item gets another number in an import of another log (a later day, a subset); before the
mapping record, scoring such rows with a dense-table package passed every range check
and looked every id up in some other id's row (found end to end: AUC 0.55 instead of 0.65).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cdp_rec.config import load_config
from cdp_rec.data.importers.cli import add_import_parser
from cdp_rec.data.id_maps import METADATA_KEY, file_id_maps, mapping_sha256
from cdp_rec.data.loader import DataError

DAY_MS = 86_400_000
T0_MS = 1_772_323_200_000  # 2026-03-01 00:00 UTC


def write_log(path: Path, items: list[str], seed: int, days: int = 3, n: int = 900) -> Path:
    rng = random.Random(seed)
    lines = ["user_id,item_id,category,ts_ms,clicked,page_no,platform"]
    for k in range(n):
        item = rng.choice(items)
        ts = T0_MS + (k * days * DAY_MS) // n
        lines.append(f"u_{rng.randrange(40):03x},{item},cat_{int(item[2:], 16) % 4},{ts},"
                     f"{int(rng.random() < 0.2)},p{rng.randrange(4)},{rng.choice(['ios', 'web'])}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_import(log: Path, out: Path, *extra: str) -> Path:
    ap = argparse.ArgumentParser()
    add_import_parser(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(["import", "--format", "events", str(log), "--out", str(out), "--ts-unit", "ms",
                       "--columns", "user=user_id,item=item_id,category=category,timestamp=ts_ms,value=clicked",
                       "--context", "page=page_no", "--scene", "client=platform",
                       "--string-ids", "user,item,category,page,client", "--quiet", *extra])
    assert a.func(a) == 0
    return out


@pytest.fixture(scope="module")
def imports(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("logs")
    items_a = [f"i_{k:04x}" for k in range(60)]
    items_b = [f"i_{k:04x}" for k in range(30, 80)]  # overlaps A; fewer distinct ids, all in A's range
    log_a = write_log(tmp / "a.csv", items_a, seed=1)
    log_b = write_log(tmp / "b.csv", items_b, seed=2, n=600)
    return {"a": run_import(log_a, tmp / "a"), "a_again": run_import(log_a, tmp / "a_again"),
            "b": run_import(log_b, tmp / "b"), "a_raw": run_import(log_a, tmp / "a_raw", "--raw-ids")}


def test_a_remapped_import_records_its_mapping_in_the_spec_and_every_file(imports):
    for name in ("a", "a_again", "b"):
        root = imports[name]
        rec = json.loads((root / "_dataset.json").read_text())["ids"]["mapping_sha256"]
        assert set(rec) == {"user_id", "item_id", "category_id", "page", "client"}
        for col, digest in rec.items():
            raw = pq.read_table(root / "ids" / f"{col}.parquet").column("raw").to_numpy()
            assert digest == mapping_sha256(raw)  # the fingerprint of ids/<col>.parquet
        files = sorted(root.glob("day=*/*.parquet"))
        assert files and all(file_id_maps(f) == rec for f in files)
    spec = lambda n: json.loads((imports[n] / "_dataset.json").read_text())["ids"]["mapping_sha256"]  # noqa: E731
    assert spec("a") == spec("a_again")  # the same log imports to the same mapping
    assert spec("a")["item_id"] != spec("b")["item_id"]
    # Raw ids need no mapping: nothing recorded.
    raw = json.loads((imports["a_raw"] / "_dataset.json").read_text())["ids"]
    assert "mapping_sha256" not in raw
    assert all(METADATA_KEY not in (pq.read_schema(f).metadata or {}) for f in imports["a_raw"].glob("day=*/*.parquet"))


def test_predict_refuses_rows_of_another_imports_dense_ids(imports, tmp_path, capsys):
    from cdp_rec.cli import main
    from cdp_rec.models import build_model
    from cdp_rec.serving import load_package
    from cdp_rec.serving.export import write_package

    a, b = imports["a"], imports["b"]
    args = (a / "train_args").read_text().split()
    cfg = load_config(None, [x for x in args if x != "--set"] + ["model.name=base"])
    b_spec = json.loads((b / "_dataset.json").read_text())
    assert b_spec["cardinality"]["item_id"]["distinct"] <= cfg.features.num_items  # B's ids pass A's range check
    torch.manual_seed(0)
    write_package(build_model(cfg).eval(), cfg, tmp_path / "pkg")
    spec = json.loads((tmp_path / "pkg" / "spec.json").read_text())
    assert spec["data_id_maps"]["columns"]["item_id"] == \
        json.loads((a / "_dataset.json").read_text())["ids"]["mapping_sha256"]["item_id"]

    test_day = max(json.loads((a / "_dataset.json").read_text())["days"])
    assert main(["predict", "--model", str(tmp_path / "pkg"), "--data", str(a), "--day", str(test_day),
                 "--out", str(tmp_path / "ok.parquet")]) == 0
    # The same log imported again: the same mapping, so its rows are accepted.
    again = sorted((imports["a_again"] / f"day={test_day:02d}").glob("*.parquet"))[0]
    assert main(["predict", "--model", str(tmp_path / "pkg"), "--data", str(again),
                 "--out", str(tmp_path / "again.parquet")]) == 0
    capsys.readouterr()

    b_file = sorted(b.glob("day=*/*.parquet"))[-1]
    for data in (b_file.parent, b_file):  # a day directory / one file: no _dataset.json beside them
        assert main(["predict", "--model", str(tmp_path / "pkg"), "--data", str(data), "--out",
                     str(tmp_path / "bad.parquet"), "--force"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cdp-rec predict: error: "), err
        assert "column 'item_id' holds dense ids of another import's mapping" in err[0], err
        assert str(b_file) in err[0]
    assert not (tmp_path / "bad.parquet").exists()

    # The Python API: an Arrow table read from such a file is refused the same way; a table
    # without the record (built by hand) is not checked.
    pkg = load_package(tmp_path / "pkg")
    table = pq.read_table(b_file)
    with pytest.raises(DataError, match="another import's mapping"):
        pkg.predict(table)
    scores = pkg.predict(table.replace_schema_metadata(None))
    assert scores.shape == (table.num_rows,) and bool(torch.isfinite(scores).all())
    ok = pq.read_table(tmp_path / "ok.parquet").column("score").to_numpy()
    assert len(ok) and np.isfinite(ok).all()


def test_evaluate_refuses_data_of_another_imports_dense_ids(imports):
    """cdp-rec evaluate --data: the import the checkpoint trained on (its config's data.root)
    against the one given, when both record a mapping."""
    from cdp_rec.cli import _check_same_id_mapping

    _check_same_id_mapping(imports["a"], imports["a_again"])  # the same log: the same mapping
    _check_same_id_mapping(imports["a"], imports["a_raw"])  # raw ids: nothing recorded, nothing to compare
    _check_same_id_mapping(imports["a"].parent / "gone", imports["b"])  # training data not on this machine
    with pytest.raises(DataError, match=r"b/_dataset\.json: column '\w+' holds dense ids of another import's "
                                        r"mapping than .*/a, which the checkpoint trained on"):
        _check_same_id_mapping(imports["a"], imports["b"])
