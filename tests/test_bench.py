"""Smoke tests of the benchmarks in bench/: each ``--quick`` run exits 0 and writes sane JSON.

No timing assertions -- the numbers depend on the machine; only that every benchmark
runs end to end and reports finite, positive numbers under the keys the docs name.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(script: str, tmp_path: Path) -> dict:
    out_json = tmp_path / f"{Path(script).stem}.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "|---|" in proc.stdout  # printed a markdown table
    data = json.loads(out_json.read_text())
    assert data["quick"] is True
    return data


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_train_step_quick(tmp_path):
    data = _run("bench/train_step.py", tmp_path)
    assert data["bench"] == "train_step"
    rows = data["rows"]
    assert {r["model"] for r in rows} == {"base", "cdp", "din", "sim"}
    assert len({(r["seq_len"], r["batch"]) for r in rows}) >= 1
    for r in rows:
        for key in ("median_step_ms", "samples_per_s", "cost_per_sample_vs_base", "peak_rss_mib"):
            assert _positive(r[key]), (key, r)
        assert r["step_peak_increase_mib"] is None or math.isfinite(r["step_peak_increase_mib"])
        if r["model"] == "base":
            assert r["cost_per_sample_vs_base"] == 1.0
    assert data["target"], "the CDP/base target was not evaluated"
    for t in data["target"].values():
        assert _positive(t["ratio"]) and isinstance(t["holds"], bool)


def test_inference_quick(tmp_path):
    data = _run("bench/inference.py", tmp_path)
    assert data["bench"] == "inference"
    (case,) = data["cases"]
    assert not case["compile"]  # --quick skips torch.compile
    for name in ("base", "cdp", "cdp, no loop", "loop alone"):
        v = case["variants"][name]
        assert _positive(v["median_ms"]) and _positive(v["p99_ms"]) and v["p99_ms"] >= v["median_ms"], (name, v)
        assert v["calls"] >= 1
    (row,) = data["rows"]
    for key in ("cdp_minus_base_ms", "cdp_minus_no_loop_ms"):
        assert math.isfinite(row[key])
    assert _positive(row["loop_share_of_cdp"])
    (t,) = data["target"].values()
    assert math.isfinite(t["cdp_minus_base_ms"]) and isinstance(t["holds"], bool)


def test_loader_quick(tmp_path):
    data = _run("bench/loader.py", tmp_path)
    assert data["bench"] == "loader" and data["days"] == 8
    for key in ("loader_rows_per_s", "bare_rows_per_s", "loader_behaviours_per_s", "bare_behaviours_per_s",
                "worst_loader_speedup_vs_training"):
        assert _positive(data[key]), key
    for model in ("base", "cdp"):
        r = data["throughput"]["train"][model]
        for key in ("held_samples_per_s", "inline_samples_per_s", "loader_speedup_vs_training"):
            assert _positive(r[key]), (model, key)
    mem = data["memory"]
    assert len(mem["rss_per_day_mib"]) == 8 and all(_positive(x) for x in mem["rss_per_day_mib"])
    assert math.isfinite(data["rss_growth"]) and math.isfinite(data["rss_growth_trimmed"])
    assert mem["rows"] == 8 * 3000
    assert isinstance(data["speedup_holds"], bool) and isinstance(data["growth_holds"], bool)


def test_checkpoint_quick(tmp_path):
    data = _run("bench/checkpoint.py", tmp_path)
    assert data["bench"] == "checkpoint"
    assert [r["world_size"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        for key in ("save_s", "load_s", "export_s", "checkpoint_bytes", "parameter_bytes", "export_bytes"):
            assert _positive(r[key]), (key, r)
        assert r["loaded_equal"] is True


def test_import_quick(tmp_path):
    data = _run("bench/import.py", tmp_path)
    assert data["bench"] == "import" and data["negatives"] == 4
    (r,) = data["rows"]
    assert r["events"] == 200_000 and r["rows"] == 5 * 200_000 and r["layout"] == "rows"
    for key in ("wall_s", "events_per_s", "rows_per_s", "peak_rss_mib", "rss_before_mib", "in_bytes", "out_bytes"):
        assert _positive(r[key]), (key, r)
    assert r["peak_rss_mib"] >= r["rss_before_mib"]


def test_id_mapping_quick(tmp_path):
    data = _run("bench/id_mapping.py", tmp_path)
    assert data["bench"] == "id_mapping"
    (r,) = data["results"]
    assert (r["batch"], r["seq_len"]) == (512, 200) and r["ids_per_batch"] == 512 * 201
    t = r["timing"]
    for name in ("lookup_fwd", "lookup_fwd_bwd", "dense", "hash", "hash+stats", "managed/1", "managed/10"):
        assert _positive(t[name]["median_ms"]), name
    for name in ("dense", "hash", "hash+stats", "managed/1", "managed/10"):
        assert _positive(t[name]["vs_lookup_fwd"]) and _positive(t[name]["vs_lookup_fwd_bwd"]), name
    for name in ("managed/1", "managed/10"):  # steady state: the table is full and evicting
        assert t[name]["occupied"] == r["rows"] - 1 and t[name]["evicted"] > 0
    assert _positive(t["managed/10"]["round_ms"]) and _positive(t["managed/10"]["amortised_ms"])


def test_serving_quick(tmp_path):
    data = _run("bench/serving.py", tmp_path)
    assert data["bench"] == "serving" and data["threads"] == 1
    assert {(r["model"], r["seq_len"], r["requests"]) for r in data["rows"]} == \
        {(m, 50, n) for m in ("base", "cdp", "sim") for n in (1, 4)}
    for case in data["cases"]:
        assert set(case["variants"]) == {"eager", "eager dedup", "pkg fp32", "pkg int8", "pkg int8 dedup"}
        for name, v in case["variants"].items():
            assert _positive(v["p50_ms"]) and _positive(v["p99_ms"]) and v["p99_ms"] >= v["p50_ms"], (name, v)
        assert case["impressions"] >= 4 * case["requests"]
        diffs = case["max_abs_logit_diff_vs_eager"]
        assert diffs["pkg fp32"] <= 1e-5 and diffs["eager dedup"] <= 1e-5, diffs
        assert 0 < diffs["pkg int8"] < 0.05 and diffs["pkg int8 dedup"] == diffs["pkg int8"], diffs
    for row in data["rows"]:
        assert _positive(row["pkg fp32|p50_vs_eager"]) and _positive(row["pkg int8|p50_vs_eager"])
