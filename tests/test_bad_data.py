"""Bad data on disk fails with exit 2 and one line naming the file or day, and is left as it was.

Through ``cdp_rec.cli.main`` in-process on a small generated data set (issue 12: a data
root that is a file (9c), a day with 0 rows or a stray Parquet file (6), a corrupt
``_dataset.json`` (7)).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cdp_rec.cli import main
from cdp_rec.config import JobConfig
from cdp_rec.data import synthetic
from cdp_rec.data.loader import DataError, check_dataset_spec, dataset_files, list_day_files


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    cfg = JobConfig()
    cfg.data.samples_per_day = 1_000
    cfg.data.rows_per_file = 500
    cfg.data.row_group_size = 250
    root = tmp_path_factory.mktemp("bad_data") / "data"
    synthetic.generate_dataset(cfg, root)
    return root


@pytest.fixture
def root(generated, tmp_path) -> Path:
    """A private copy of the generated data set (rows layout, days 0-1 train, day 2 test)."""
    return Path(shutil.copytree(generated, tmp_path / "data"))


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}


def run_train(capsys, data: Path, tmp_path: Path, *sets: str) -> str:
    """``cdp-rec train --data DATA``: exit 2, exactly one stderr line, data untouched; return the line."""
    before = snapshot(data)
    args = ["train", "--data", str(data), "--set", f"train.run_dir={tmp_path / 'runs'}",
            "--set", "data.generate_if_missing=false", "--set", "train.progress=false"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("cdp-rec train: error: "), lines[0]
    assert snapshot(data) == before  # the user's files are not modified, added or removed
    return lines[0]


# ----------------------------------------------------------------------- 9c: root is a file


def test_data_root_that_is_a_file(capsys, tmp_path):
    data = tmp_path / "data.parquet"
    data.write_bytes(b"PAR1 not really")
    line = run_train(capsys, data, tmp_path)
    assert line.endswith(f"{data}: data root is a file, not a directory")


# ----------------------------------------------------------------------- 6: silent drops


def _empty_day(root: Path, day: int) -> Path:
    day_dir = root / f"day={day:02d}"
    files = sorted(day_dir.glob("part-*.parquet"))
    schema = pq.read_schema(files[0])
    for f in files[1:]:
        f.unlink()
    pq.write_table(schema.empty_table(), files[0])
    return day_dir


def test_training_day_with_zero_rows(capsys, root, tmp_path):
    day_dir = _empty_day(root, 1)
    line = run_train(capsys, root, tmp_path)
    assert f"{day_dir}: day=01 has 0 rows" in line
    assert "data.allow_empty_days" in line


def test_every_test_day_empty_is_refused_before_training(capsys, root, tmp_path):
    """With data.allow_empty_days the empty test day used to pass, the model trained, and
    scoring it ended in a ValueError traceback ('cannot compute CTR metrics on empty input')."""
    _empty_day(root, 2)
    line = run_train(capsys, root, tmp_path, "data.allow_empty_days=true")
    assert line.endswith("the test day(s) [2] hold 0 rows (data.allow_empty_days skipped them): nothing to score "
                         "the model on; set data.test_days / data.train_days to days with rows"), line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))


def test_empty_day_is_a_warning_when_allowed(root, caplog):
    day_dir = _empty_day(root, 1)
    with pytest.raises(DataError, match=r"day=01 has 0 rows"):
        dataset_files(root, [0, 1])
    with caplog.at_level(logging.WARNING, logger="cdp_rec.data.loader"):
        files = dataset_files(root, [0, 1], allow_empty=True)
    assert files[-1].parent == day_dir and len(files) == 3
    assert any("day=01 has 0 rows" in r.getMessage() for r in caplog.records)


def test_a_day_holding_other_rows_than_its_spec_says_is_refused(capsys, root, tmp_path):
    """A part file copied in twice (or one left over, or lost) changes a day's rows: the spec's
    count (generator: samples_per_day; import: day_stats) refuses it instead of training on it."""
    day_dir = root / "day=01"
    files = sorted(day_dir.glob("part-*.parquet"))
    want = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    extra = pq.ParquetFile(files[0]).metadata.num_rows
    shutil.copy(files[0], day_dir / "part-00099.parquet")
    line = run_train(capsys, root, tmp_path)
    assert (f"{day_dir}: its {len(files) + 1} file(s) hold {want + extra:,} rows, {root / '_dataset.json'} says "
            f"{want:,}: a part file copied in, left over or missing?") in line
    (day_dir / "part-00099.parquet").unlink()
    assert list_day_files(root, 1) == files


def test_stray_parquet_file_in_a_day(capsys, root, tmp_path):
    day_dir = root / "day=00"
    shutil.copy(day_dir / "part-00000.parquet", day_dir / "extra.parquet")  # valid Parquet, wrong name
    shutil.copy(day_dir / "part-00001.parquet", day_dir / "part-00002.parquet.bak")
    (day_dir / "_SUCCESS").write_text("")  # bookkeeping / hidden / unfinished: skipped
    (day_dir / ".part-00000.parquet.crc").write_bytes(b"\0")
    (day_dir / "part-00009.parquet.tmp").write_bytes(b"half a file")
    line = run_train(capsys, root, tmp_path)
    assert (f"{day_dir}: 2 entries not named part-*.parquet would be ignored: "
            f"extra.parquet, part-00002.parquet.bak") in line
    assert "_SUCCESS" not in line and ".crc" not in line and ".tmp;" not in line


def test_ignored_names_do_not_count(root):
    day_dir = root / "day=00"
    want = list_day_files(root, 0)
    (day_dir / "_SUCCESS").write_text("")
    (day_dir / ".hidden.parquet").write_bytes(b"x")
    assert list_day_files(root, 0) == want
    (day_dir / "notes").mkdir()
    with pytest.raises(DataError, match=r"1 entry not named part-\*\.parquet would be ignored: notes"):
        list_day_files(root, 0)


# ----------------------------------------------------------------------- 7: corrupt _dataset.json


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"features": {"num_users": ', "cannot read data set spec: invalid JSON at line 1 column 28: Expecting value"),
        ("[1, 2]", "cannot read data set spec: expected a JSON object, got list"),
        ('"features"', "cannot read data set spec: expected a JSON object, got str"),
        ('{"features": [1]}', "'features' must be a JSON object, got list"),
    ],
)
def test_corrupt_dataset_spec(capsys, root, tmp_path, text, message):
    spec = root / "_dataset.json"
    spec.write_text(text)
    line = run_train(capsys, root, tmp_path)
    assert line.endswith(f"{spec}: {message}")


def test_binary_dataset_spec(root):
    spec = root / "_dataset.json"
    spec.write_bytes(b"\xff\xfe\x00garbage\n\x00")
    with pytest.raises(DataError) as e:
        check_dataset_spec(root, JobConfig().features)
    assert str(e.value).startswith(f"{spec}: cannot read data set spec:") and "\n" not in str(e.value)


def test_dataset_spec_nested_past_the_parsers_stack(root):
    spec = root / "_dataset.json"
    spec.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError) as e:
        check_dataset_spec(root, JobConfig().features)
    assert str(e.value) == f"{spec}: cannot read data set spec: JSON nested too deeply"
