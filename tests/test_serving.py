"""Serving packages: ``export --serving``, ``load_package(...).predict``, ``cdp-rec predict``.

On tiny trained runs (base, cdp, sim; one epoch of 2 x 8000 impressions):

* the fp32 package's scores equal the training model's eval scores (max |diff| <= 1e-5)
  and give the same AUC; fp16 / int8 packages keep the AUC within 0.002 of fp32;
* the int8 tables are exactly what TorchRec's ``quantize_embeddings`` makes of the model;
* hash and managed id mappings give the model's rows (unseen and negative raw ids too);
* ``cdp-rec predict`` writes request_id, item_id, score in input order, equal to the Python
  API, from a process where the training code, the model classes and the generator
  cannot be imported;
* bad inputs are one-line errors with exit 2 naming the file / field: schema mismatch,
  out-of-range ids, a data set of another spec, a damaged or swapped package; a program
  or weights file that would run code is refused before anything runs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cdp_rec.cli import main
from cdp_rec.config import JobConfig, load_config
from cdp_rec.data.loader import DataError, ParquetBatchReader, dataset_files
from cdp_rec.metrics import auc
from cdp_rec.serving import load_package
from cdp_rec.checksums import digest_files
from cdp_rec.serving.package import MANIFEST, PackageError, package_sha256

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("base", "cdp", "sim")
TEST_DAY = 2


def _overrides(root: Path, run_dir: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.root={root}", "data.samples_per_day=8000", "data.rows_per_file=4000", "data.row_group_size=1000",
        f"train.run_dir={run_dir}", f"train.run_name={name}", "train.progress=false", "train.batch_size=256",
        "train.eval_batch_size=1000", *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Data set + one trained checkpoint per model + its eval scores on the test day."""
    from cdp_rec.data.synthetic import generate_dataset
    from cdp_rec.training.checkpoint import list_checkpoints, load_unsharded
    from cdp_rec.training.trainer import train

    base = tmp_path_factory.mktemp("serving")
    data = base / "data"
    generate_dataset(load_config(None, _overrides(data, base, "x")), data)
    out: dict = {"data": data, "base": base, "ckpt": {}, "ref": {}}
    for m in MODELS:
        train(load_config(None, _overrides(data, base / "runs", m, f"model.name={m}")))
        ckpt = list_checkpoints(base / "runs" / m / "checkpoints")[-1]
        model, cfg = load_unsharded(ckpt)
        model.eval()
        scores, labels = [], []
        with torch.no_grad():
            for b in _reader(data, cfg):
                scores.append(torch.sigmoid(model(model.prepare_batch(b))[1]["logits"]))
                labels.append(b.labels)
        out["ckpt"][m] = ckpt
        out["ref"][m] = (torch.cat(scores).numpy(), torch.cat(labels).numpy())
    return out


def _reader(data: Path, cfg: JobConfig) -> ParquetBatchReader:
    return ParquetBatchReader(dataset_files(data, [TEST_DAY]), cfg.features, 1000)


@pytest.fixture(scope="module")
def packages(runs) -> dict:
    """(model, dtype) -> package directory, written by the CLI."""
    pkgs = {}
    for m in MODELS:
        for dtype in ("fp32", "fp16", "int8"):
            out = runs["base"] / "pkg" / f"{m}-{dtype}"
            assert main(["export", "--serving", "--checkpoint", str(runs["ckpt"][m]), "--out", str(out),
                         "--dtype", dtype]) == 0
            pkgs[m, dtype] = out
    return pkgs


_LOADED: dict[Path, object] = {}


def _scores(pkg_dir: Path, runs: dict) -> np.ndarray:
    pkg = _LOADED.get(pkg_dir) or _LOADED.setdefault(pkg_dir, load_package(pkg_dir))
    return torch.cat([pkg.predict(b) for b in _reader(runs["data"], JobConfig())]).numpy()


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("model", MODELS)
def test_fp32_package_scores_equal_eval_scores(runs, packages, model):
    ref, labels = runs["ref"][model]
    got = _scores(packages[model, "fp32"], runs)
    assert got.shape == ref.shape == (8000,)
    diff = float(np.abs(got - ref).max())
    print(f"{model} fp32: max |package - eval| = {diff:.2e}")
    assert diff <= 1e-5
    assert abs(auc(got, labels) - auc(ref, labels)) <= 1e-5


@pytest.mark.parametrize("model", MODELS)
def test_fp16_and_int8_packages_keep_the_auc(runs, packages, model):
    _, labels = runs["ref"][model]
    fp32 = _scores(packages[model, "fp32"], runs)
    for dtype in ("fp16", "int8"):
        got = _scores(packages[model, dtype], runs)
        delta = auc(got, labels) - auc(fp32, labels)
        print(f"{model} {dtype}: AUC {auc(got, labels):.5f} vs fp32 {auc(fp32, labels):.5f} ({delta:+.5f}), "
              f"max |score - fp32| = {np.abs(got - fp32).max():.2e}")
        assert abs(delta) <= 0.002
        assert 0 < np.abs(got - fp32).max() < 0.05  # quantized (not the fp32 tables), and only slightly off


def test_int8_tables_are_torchrecs_quantization(runs, packages):
    from torch import nn
    from torchrec.inference.modules import quantize_embeddings

    from cdp_rec.training.checkpoint import load_unsharded

    model, cfg = load_unsharded(runs["ckpt"]["cdp"])
    holder = nn.Module()
    holder.ebc = model.ebc
    quantized = quantize_embeddings(holder, dtype=torch.int8, inplace=False).ebc
    pkg = load_package(packages["cdp", "int8"])
    batch = model.prepare_batch(next(iter(_reader(runs["data"], cfg))))
    with torch.no_grad():
        assert torch.equal(pkg._ebc(batch.sparse).values(), quantized(batch.sparse).values())


def test_hash_and_managed_id_mappings_give_the_models_rows(tmp_path):
    from bench._common import synthetic_batches
    from cdp_rec.models import build_model
    from cdp_rec.serving.export import write_package

    cfg = load_config(None, ["features.id_mapping={item: managed, user: hash, category: managed}",
                             "features.num_categories=32", "features.num_items=3000", "model.name=cdp"])
    torch.manual_seed(0)
    model = build_model(cfg)

    def raw(batch, salt):  # dense ids -> raw 64-bit ids (negative ones too); unseen ones with another salt
        kjt = batch.sparse
        parts = []
        for key, jt in kjt.to_dict().items():
            v = jt.values()
            if key in ("item_id", "hist_item_ids", "category_id", "hist_category_ids", "user_id"):
                v = v * 1_000_003 - 7 * 10**15 + salt
            parts.append((v, jt.lengths()))
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        sparse = KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat([p[0] for p in parts]),
                                   lengths=torch.cat([p[1] for p in parts]))
        return type(batch)(sparse, batch.labels, batch.user_ids, batch.request_ids)

    dense_features = JobConfig().features  # ids drawn in the default vocabularies (< 3000 items)
    dense_features.num_items = 3000
    seen = [raw(b, 0) for b in synthetic_batches(dense_features, 64, 30, 3, seed=1)]
    model.train()
    with torch.no_grad():
        for b in seen[:2]:
            model.prepare_batch(b)  # training mode: the managed tables admit these ids
    model.eval()
    unseen = raw(synthetic_batches(dense_features, 64, 30, 1, seed=2)[0], 5)
    manifest, _ = write_package(model, cfg, tmp_path / "pkg", "fp32")
    assert manifest["tables"]["item"]["mapping"] == "managed" and manifest["tables"]["item"]["held_ids"] > 0
    assert manifest["tables"]["user"]["mapping"] == "hash"
    pkg = load_package(tmp_path / "pkg")
    with torch.no_grad():
        for b in (*seen, unseen):
            ref = torch.sigmoid(model(model.prepare_batch(b))[1]["logits"])
            assert float((pkg.predict(b) - ref).abs().max()) <= 1e-5


# ----------------------------------------------------------------------------- predict


_BLOCKER = """
import importlib.abc, sys
BLOCKED = ("cdp_rec.training", "cdp_rec.models", "cdp_rec.data.synthetic", "cdp_rec.compare", "cdp_rec.cli",
           "cdp_rec.serving.export")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("training code is not importable here: " + name)
        return None
sys.meta_path.insert(0, Blocker())
from cdp_rec.serving import load_package
from cdp_rec.serving.predict import predict_to_parquet
stats = predict_to_parquet(load_package(sys.argv[1]), sys.argv[2], sys.argv[3], batch_size=700)
loaded = sorted(m for m in sys.modules
                if m.startswith(("cdp_rec.training", "cdp_rec.models", "cdp_rec.data.synthetic")))
print(stats.rows, loaded)
"""


def test_predict_without_the_training_code_equals_the_python_api(runs, packages, tmp_path):
    pkg = packages["sim", "int8"]
    out = tmp_path / "preds.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", _BLOCKER, str(pkg), str(runs["data"] / "day=02"), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["8000", "[]"]  # every row; no training module was loaded
    table = pq.read_table(out)
    assert table.schema.names == ["request_id", "item_id", "score"]
    inputs = pa.concat_tables([pq.read_table(f, columns=["request_id", "item_id"])
                               for f in dataset_files(runs["data"], [TEST_DAY])])
    assert table.column("request_id").equals(inputs.column("request_id"))
    assert table.column("item_id").equals(inputs.column("item_id"))
    np.testing.assert_allclose(table.column("score").to_numpy(), _scores(pkg, runs), rtol=0, atol=1e-6)


def test_predict_cli_and_arrow_input(runs, packages, tmp_path, capsys):
    out = tmp_path / "p.parquet"
    args = ["predict", "--model", str(packages["cdp", "fp32"]), "--data", str(runs["data"]), "--day", "2",
            "--out", str(out)]
    assert main(args) == 0
    assert "scored 8000 rows" in capsys.readouterr().out
    np.testing.assert_allclose(pq.read_table(out).column("score").to_numpy(), runs["ref"]["cdp"][0], atol=1e-5)
    assert main(args) == 2  # exists: not replaced without --force
    assert "exists; use --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    # The Python API takes Arrow tables in the training schema too (the label is not needed).
    file = dataset_files(runs["data"], [TEST_DAY])[0]
    table = pq.read_table(file).drop_columns(["label"]).slice(0, 50)
    got = load_package(packages["cdp", "fp32"]).predict(table).numpy()
    np.testing.assert_allclose(got, runs["ref"]["cdp"][0][:50], atol=1e-5)


# ----------------------------------------------------------------------------- bad inputs


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"cdp-rec {argv[0]}: error: "), err[0]
    return err[0]


def _bad_file(runs, tmp_path, edit) -> Path:
    src = dataset_files(runs["data"], [TEST_DAY])[0]
    table = edit(pq.read_table(src))
    path = tmp_path / "bad" / "part-0.parquet"
    path.parent.mkdir(exist_ok=True)
    pq.write_table(table, path)
    return path


def test_predict_refuses_bad_data_in_one_line(runs, packages, tmp_path, capsys):
    pkg = str(packages["base", "int8"])

    def run(path: Path) -> str:
        return _one_error_line(capsys, ["predict", "--model", pkg, "--data", str(path), "--out",
                                        str(tmp_path / "o.parquet")])

    missing = _bad_file(runs, tmp_path, lambda t: t.drop_columns(["page"]))
    line = run(missing)
    assert str(missing) in line and "column 'page' is missing" in line
    retyped = _bad_file(runs, tmp_path, lambda t: t.set_column(t.schema.get_field_index("hour"), "hour",
                                                                 t.column("hour").cast(pa.int32())))
    assert "column 'hour' has type int32, expected int64" in run(retyped)
    num_items = JobConfig().features.num_items

    def out_of_range(t):
        items = t.column("item_id").to_numpy().copy()
        items[3] = num_items
        return t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(items))

    line = run(_bad_file(runs, tmp_path, out_of_range))
    assert "column 'item_id'" in line and f"out of range [0, {num_items})" in line and "row 3" in line
    assert not (tmp_path / "o.parquet").exists()  # nothing that looks complete is left behind
    # A data root written for another feature spec: the key is named.
    other = tmp_path / "other"
    shutil.copytree(runs["data"], other)
    spec = json.loads((other / "_dataset.json").read_text())
    spec["features"]["num_items"] = 9999
    (other / "_dataset.json").write_text(json.dumps(spec))
    assert "features.num_items is 9999 in the data set" in run(other)
    # The Python API names the feature of an id a dense table cannot take.
    batch = next(iter(_reader(runs["data"], JobConfig())))
    values = batch.sparse.values().clone()
    values[0] = -1  # the first query_id
    bad = type(batch)(type(batch.sparse)(keys=batch.sparse.keys(), values=values, lengths=batch.sparse.lengths()),
                      batch.labels, batch.user_ids, batch.request_ids)
    with pytest.raises(DataError, match=r"feature 'query_id': 1 id\(s\) out of range \[0, 500\)"):
        load_package(packages["base", "int8"]).predict(bad)


def test_damaged_or_swapped_packages_are_refused(runs, packages, tmp_path, capsys):
    def predict(pkg: Path, *extra: str) -> str:
        return _one_error_line(capsys, ["predict", "--model", str(pkg), "--data", str(runs["data"]), "--day", "2",
                                        "--out", str(tmp_path / "o.parquet"), *extra])

    flipped = Path(shutil.copytree(packages["cdp", "int8"], tmp_path / "flipped"))
    weight = flipped / "tables" / "item.weight.npy"
    data = bytearray(weight.read_bytes())
    data[-1] ^= 0xFF
    weight.write_bytes(bytes(data))
    line = predict(flipped)
    assert str(weight) in line and "sha256 differs from manifest.json" in line
    cut = Path(shutil.copytree(packages["cdp", "int8"], tmp_path / "cut"))
    program = cut / "dense" / "program.json"
    program.write_bytes(program.read_bytes()[:-10])
    assert f"{program}: is " in predict(cut) and "were exported (truncated" in predict(cut)
    assert "nothing-here: not a serving package (not found)" in predict(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    assert "not a serving package (no manifest.json" in predict(tmp_path / "empty")
    # Version 1 packages MEAN-pooled in the lookup; their dense program does not divide, so
    # this runtime (SUM lookup) would score them wrong: refused, naming the re-export.
    old = Path(shutil.copytree(packages["base", "fp32"], tmp_path / "v1"))
    manifest = json.loads((old / MANIFEST).read_text())
    assert manifest["format_version"] == 2
    (old / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    line = predict(old)
    assert f"{old / MANIFEST}: package format version 1; this cdp-rec reads version 2" in line and "re-export" in line
    good = packages["cdp", "int8"]
    other = package_sha256(packages["cdp", "fp32"])
    assert "not the expected" in predict(good, "--expect-sha256", other)
    assert main(["predict", "--model", str(good), "--data", str(runs["data"]), "--day", "2", "--out",
                 str(tmp_path / "o.parquet"), "--expect-sha256", package_sha256(good)]) == 0


def _retamper(pkg: Path, name: str, content: bytes) -> None:
    """Rewrite one file *and* the manifest's digests: a deliberate tamper, not damage."""
    (pkg / name).write_bytes(content)
    manifest = json.loads((pkg / MANIFEST).read_text())
    manifest["files"] = digest_files(pkg, sorted(manifest["files"]))
    (pkg / MANIFEST).write_text(json.dumps(manifest))


class _RunsCode:
    def __reduce__(self):
        return (os.getpid, ())


def _first(obj, has):
    """The first dict (depth first) in a JSON object for which ``has(dict)`` holds."""
    if isinstance(obj, dict):
        if has(obj):
            return obj
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = _first(child, has)
        if found is not None:
            return found
    return None


def test_a_package_that_would_run_code_is_refused_before_running_it(packages, tmp_path):
    src = packages["base", "fp32"]
    text = (src / "dense" / "program.json").read_text()
    aten = lambda d: str(d.get("target", "")).startswith("torch.ops.aten.")  # noqa: E731
    cases = {
        "target": (lambda p: _first(p, aten).update(target="torch.os.system"),
                   "node target 'torch.os.system' is not an ATen operator"),
        "guards": (lambda p: p.update(guards_code=["__import__('os').getpid()"]), "holds guards_code"),
        "expr": (lambda p: _first(p, lambda d: "expr_str" in d).update(expr_str="__import__('os').getpid()"),
                 "is not an integer expression"),
    }
    for name, (edit, message) in cases.items():
        pkg = Path(shutil.copytree(src, tmp_path / name))
        program = json.loads(text)
        edit(program)
        _retamper(pkg, "dense/program.json", json.dumps(program).encode())
        with pytest.raises(PackageError, match=message):
            load_package(pkg)
    pkg = Path(shutil.copytree(src, tmp_path / "pickle"))
    _retamper(pkg, "dense/weights.pt", pickle.dumps(_RunsCode()))
    with pytest.raises(PackageError, match="weights.pt: not a readable tensor file"):
        load_package(pkg)


def test_export_rules(runs, packages, tmp_path, capsys):
    ckpt = str(runs["ckpt"]["base"])
    out = str(packages["base", "fp32"])
    assert "holds a previous export; use --force" in _one_error_line(
        capsys, ["export", "--serving", "--checkpoint", ckpt, "--out", out])
    assert "--dtype and --compile apply to --serving" in _one_error_line(
        capsys, ["export", "--checkpoint", ckpt, "--out", str(tmp_path / "x"), "--dtype", "int8"])
    from cdp_rec.models import build_model
    from cdp_rec.serving.export import write_package

    cfg = load_config(None, ["model.name=din"])
    with pytest.raises(PackageError, match="model.name=din: no serving export"):
        write_package(build_model(cfg), cfg, tmp_path / "din")
    assert not (tmp_path / "din").exists()


@pytest.mark.slow
def test_aoti_build_equals_the_exported_program(runs, packages, tmp_path, capsys):
    out = tmp_path / "aoti"
    assert main(["export", "--serving", "--checkpoint", str(runs["ckpt"]["base"]), "--out", str(out),
                 "--dtype", "int8", "--compile", "aoti"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest["dense"].get("aoti_error"):
        pytest.skip(f"AOTInductor does not compile here: {manifest['dense']['aoti_error']}")
    native = load_package(out, native=True)
    assert native.dense_format == "aoti"
    exported = _scores(out, runs)
    got = torch.cat([native.predict(b) for b in _reader(runs["data"], JobConfig())]).numpy()
    np.testing.assert_allclose(got, exported, rtol=0, atol=1e-6)
    with pytest.raises(PackageError, match="has no AOTInductor build"):
        load_package(packages["base", "int8"], native=True)


@pytest.mark.parametrize("model", MODELS)
def test_request_deduplicated_batches_score_the_same(runs, packages, model):
    from cdp_rec.data.loader import share_histories

    pkg = _LOADED.get(packages[model, "int8"]) or load_package(packages[model, "int8"])
    shared_rows = 0
    for batch in _reader(runs["data"], JobConfig()):
        dedup = share_histories(batch)  # one history per request + history_row, as the reader emits it
        shared_rows += int((dedup.history_row != torch.arange(len(batch))).sum())
        assert torch.equal(pkg.predict(dedup), pkg.predict(batch))
    assert shared_rows > 1000  # most rows took their request's history


# ----------------------------------------------------------------------------- hostile inputs


def test_predict_never_writes_over_or_into_the_data_it_scores(runs, packages, tmp_path, capsys):
    root = Path(shutil.copytree(runs["data"], tmp_path / "data"))  # a copy: a failure must not eat the fixture
    pkg = str(packages["base", "int8"])
    first = dataset_files(root, [TEST_DAY])[0]
    before = first.read_bytes()

    def run(data: Path, out: Path, *extra: str) -> str:
        return _one_error_line(capsys, ["predict", "--model", pkg, "--data", str(data), *extra, "--out", str(out),
                                        "--force"])

    line = run(root, first, "--day", "2")  # the probe: --force over a file it is reading
    assert f"{first}: is inside the data root being scored" in line
    line = run(first, first)  # --data the file itself
    assert f"{first}: is the input file being scored" in line
    line = run(root, root / "preds.parquet")  # a new file inside the root: read back as data next time
    assert "is inside the data root being scored" in line
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    assert "is inside the data root being scored" in run(root, link / first.parent.name / first.name, "--day", "2")
    assert "is inside the data root being scored" in run(link, first, "--day", "2")
    assert first.read_bytes() == before
    assert not (root / "preds.parquet").exists()
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name]
    # Outside the data is fine.
    assert main(["predict", "--model", pkg, "--data", str(first), "--out", str(tmp_path / "one.parquet")]) == 0
    assert main(["predict", "--model", pkg, "--data", str(root), "--day", "2", "--out",
                 str(tmp_path / "p.parquet")]) == 0


def _write_npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_non_finite_weights_or_scores_are_refused(runs, packages, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.parquet"

    def predict(pkg: Path) -> str:
        return _one_error_line(capsys, ["predict", "--model", str(pkg), "--data", str(runs["data"]), "--day", "2",
                                        "--out", str(out)])

    # fp32 table bytes replaced by NaN, digests re-computed (the probe's package).
    pkg = Path(shutil.copytree(packages["cdp", "fp32"], tmp_path / "nan-fp32"))
    weight = np.load(pkg / "tables" / "item.weight.npy")
    _retamper(pkg, "tables/item.weight.npy", _write_npy(np.full(weight.shape[0] * weight.shape[1] // 4, np.nan,
                                                                np.float32).view(np.uint8).reshape(weight.shape)))
    line = predict(pkg)
    assert f"{pkg / 'tables' / 'item.weight.npy'}: the table's weight holds NaN / inf in 5000 row(s)" in line
    # int8: the codes are integers; the fp16 scale / bias of a row can be NaN.
    pkg = Path(shutil.copytree(packages["cdp", "int8"], tmp_path / "nan-int8"))
    ss = np.load(pkg / "tables" / "user.scale_shift.npy").copy()
    ss[5] = np.full(2, np.inf, np.float16).view(np.uint8)
    _retamper(pkg, "tables/user.scale_shift.npy", _write_npy(ss))
    assert "user.scale_shift.npy: the table's scale / bias holds NaN / inf in 1 row(s), first row 5" in predict(pkg)
    # The dense graph's weights.
    pkg = Path(shutil.copytree(packages["base", "fp32"], tmp_path / "nan-dense"))
    weights = torch.load(pkg / "dense" / "weights.pt", weights_only=True)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.nn.Parameter(torch.full_like(weights[name], float("nan")), requires_grad=False)
    import io

    buf = io.BytesIO()
    torch.save(weights, buf)
    _retamper(pkg, "dense/weights.pt", buf.getvalue())
    assert f"weights.pt: {name!r} holds NaN / inf" in predict(pkg)
    assert not out.exists()
    # Whatever else makes a logit NaN: refused at scoring, naming the package; nothing is written.
    from cdp_rec.serving.predict import predict_to_parquet

    model = load_package(packages["base", "int8"])
    real = model._dense
    monkeypatch.setattr(model, "_dense", lambda *a: torch.where(torch.arange(len(a[0])) == 3, float("nan"), real(*a)))
    with pytest.raises(PackageError, match=rf"{packages['base', 'int8']}: the package scored 1 of 1000 row\(s\) "
                                           r"NaN / inf \(first: row 3\)"):
        predict_to_parquet(model, runs["data"] / f"day={TEST_DAY:02d}", out, batch_size=1000)
    assert not out.exists() and not list(tmp_path.glob(".o.parquet.tmp-*"))


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    """A copy of package ``src`` whose manifest.json went through ``edit(dict)`` (the manifest is not
    among its own digests, so the copy passes every file check)."""
    pkg = Path(shutil.copytree(src, dst))
    manifest = json.loads((pkg / MANIFEST).read_text())
    edit(manifest)
    (pkg / MANIFEST).write_text(json.dumps(manifest))
    return pkg


def test_manifest_fields_are_cross_checked(runs, packages, tmp_path, capsys):
    def predict(pkg: Path) -> str:
        line = _one_error_line(capsys, ["predict", "--model", str(pkg), "--data", str(runs["data"]), "--day", "2",
                                        "--out", str(tmp_path / "o.parquet")])
        assert not (tmp_path / "o.parquet").exists()
        return line

    cdp, sim = packages["cdp", "int8"], packages["sim", "int8"]
    # prep.kind "none" on a CDP package: was a KeyError 'hist_item_ids' while scoring.
    pkg = _edit_manifest(cdp, tmp_path / "prep", lambda m: m["prep"].update(kind="none"))
    assert f"{pkg / MANIFEST}: prep.kind 'none' does not fit model 'cdp', whose export writes 'category_filter'" \
        in predict(pkg)
    pkg = _edit_manifest(cdp, tmp_path / "din", lambda m: m.update(model="din"))
    assert f"{pkg / MANIFEST}: model 'din' has no serving export" in predict(pkg)
    pkg = _edit_manifest(cdp, tmp_path / "ablation", lambda m: m.update(model="cdp_no_moe"))
    assert f"{pkg / MANIFEST}: model 'cdp_no_moe', but {pkg / 'config.json'} has model.name 'cdp'" in predict(pkg)
    pkg = _edit_manifest(sim, tmp_path / "family", lambda m: m.update(family="pooled"))
    assert "family 'pooled' does not fit model 'sim'" in predict(pkg)
    pkg = _edit_manifest(sim, tmp_path / "topk", lambda m: m["prep"].update(top_k=7))
    assert "prep.top_k 7 and lookups.ec.seq_len 50 must be the same" in predict(pkg)
    # A table's mapping against spec.json's features.id_mapping ({}: every table dense).
    pkg = _edit_manifest(cdp, tmp_path / "hash", lambda m: m["tables"]["item"].update(mapping="hash"))
    line = predict(pkg)
    assert f"{pkg / MANIFEST}: table 'item' has mapping 'hash', but {pkg / 'spec.json'} features.id_mapping " \
           "makes it 'dense'" in line
    pkg = _edit_manifest(cdp, tmp_path / "features", lambda m: m["tables"]["user"].update(features=["query_id"]))
    assert "table 'user' lists feature 'query_id', whose ids" in predict(pkg)
    # The dense inputs against the lookups, and the program's own signature against the manifest.
    pkg = _edit_manifest(cdp, tmp_path / "shape", lambda m: m["dense"]["inputs"][0].update(shape=["batch", 999]))
    assert f"{pkg / MANIFEST}: dense.inputs: input 0 is pooled float32 [\"batch\", 999], the lookups feed pooled " \
           "float32 [\"batch\", 144]" in predict(pkg)
    pkg = Path(shutil.copytree(cdp, tmp_path / "swapped-program"))  # SIM's dense graph in a CDP package
    for name in ("program.json", "weights.pt", "constants.pt"):
        _retamper(pkg, f"dense/{name}", (sim / "dense" / name).read_bytes())
    line = predict(pkg)
    assert f"{pkg / 'dense' / 'program.json'}: input 0 of the program is pooled float32 [\"batch\", 96]; " \
           f"{pkg / MANIFEST} dense.inputs says pooled float32 [\"batch\", 144]" in line
    # Every exported package passes all of these.
    for p in packages.values():
        load_package(p)
