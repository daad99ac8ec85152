"""Raw 64-bit ids: hash and managed-collision tables (embeddings/id_mapping.py), the loader's
acceptance of raw ids, the generator's raw ids and churn, every zoo model on raw ids, the
per-day report, checkpoints (resume, reshard, export) and sharded training on gloo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec import JaggedTensor, KeyedJaggedTensor

from cdp_rec.config import ConfigError, JobConfig, MODEL_NAMES, load_config
from cdp_rec.data.loader import DataError, ParquetBatchReader, list_day_files
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch
from embeddings.id_mapping import (
    EMPTY,
    ManagedTable,
    ReferenceManagedTable,
    eviction_policy,
    hash_rows,
    mix64,
    row_init,
)
from bench._common import free_port

MAPPING = "features.id_mapping={item: managed, user: managed, query: hash, category: hash}"
SMALL = ["data.samples_per_day=3000", "data.rows_per_file=1500", "data.row_group_size=500", "train.progress=false"]


# --------------------------------------------------------------------------- hash


def _np_splitmix(v: np.ndarray) -> np.ndarray:
    z = v.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def test_hash_is_splitmix64_bit_for_bit_and_stable():
    ids = torch.tensor([0, 1, -1, 7, 2**62 + 5, -(2**63), 2**63 - 2, 123456789012345], dtype=torch.int64)
    assert np.array_equal(mix64(ids).numpy().view(np.uint64), _np_splitmix(ids.numpy()))
    rows = hash_rows(ids, 1000)
    assert rows.min() >= 0 and rows.max() < 1000
    expect = ((_np_splitmix(ids.numpy()) >> np.uint64(1)) % np.uint64(1000)).astype(np.int64)
    assert rows.tolist() == expect.tolist()
    # Pinned values: a change of the function would silently remap every trained table.
    assert hash_rows(torch.tensor([0, 1, -1, 42]), 5000).tolist() == [0, 4394, 1533, 4481]


def test_row_init_is_deterministic_and_in_bounds():
    rows = torch.tensor([0, 3, 999])
    a, b = row_init("item", rows, 8, 1000), row_init("item", rows, 8, 1000)
    assert torch.equal(a, b) and a.shape == (3, 8)
    assert float(a.abs().max()) <= (1 / 1000) ** 0.5
    assert not torch.equal(a, row_init("user", rows, 8, 1000))


# --------------------------------------------------------------------------- managed


def _step(mc: ManagedTable, ids: list[int]) -> tuple[list[int], list[int]]:
    v = torch.tensor(ids, dtype=torch.int64)
    jt = {"t": JaggedTensor(values=v, lengths=torch.tensor([len(ids)]))}
    mc.profile(jt)
    reset = mc.evict()
    return mc.remap(jt)["t"].values().tolist(), [] if reset is None else sorted(reset.tolist())


def test_managed_same_id_same_row_distinct_ids_distinct_rows_while_room():
    mc = ManagedTable("t", 101, eviction_policy("distance_lfu"), 1).train()
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(-(2**62), 2**62, (100,), generator=g)  # 100 = capacity (101 rows, one shared)
    seen: dict[int, int] = {}
    for _ in range(6):
        batch = pool[torch.randint(0, 100, (80,), generator=g)].tolist()
        rows, _ = _step(mc, batch)
        for i, r in zip(batch, rows):
            assert seen.setdefault(i, r) == r  # same raw id -> same row, across batches
    assert len(set(seen.values())) == len(seen)  # distinct ids -> distinct rows
    assert max(seen.values()) < 100  # row 100 is the shared row of ids without one
    assert mc.occupied() == len(seen) and int(mc._evicted_total) == 0
    # Evaluation maps but never admits: an unseen id gets the shared last row.
    mc.eval()
    before = mc._mch_sorted_raw_ids.clone()
    assert _step(mc, [int(pool[0]), 5])[0] == [seen[int(pool[0])], 100]
    assert torch.equal(before, mc._mch_sorted_raw_ids)


def test_managed_full_table_evicts_and_counts():
    mc = ManagedTable("t", 6, eviction_policy("distance_lfu"), 1).train()
    assert _step(mc, [10, 11, 12])[0] == [2, 3, 4]
    _step(mc, [10, 13, 14])
    rows, reset = _step(mc, [15, 16, 17])  # full (5 ids): three of the stale ones make room
    assert len(set(rows)) == 3 and 5 not in rows and reset == sorted(rows)
    assert mc.occupied() == 5 and int(mc._admitted_total) == 8 and int(mc._evicted_total) == 3


def test_ttl_frees_rows_of_unseen_ids_and_a_returning_id_gets_a_fresh_row():
    mc = ManagedTable("t", 50, eviction_policy("lru"), 1, ttl_steps=3).train()
    (row_a,), _ = _step(mc, [111])
    for _ in range(3):
        _step(mc, [222])  # 111 unseen for 3 steps: still held
    assert _step(mc, [222])[1] == [row_a]  # 4th step without it: freed, its row reset
    assert int(mc._expired_total) == 1 and mc.occupied() == 1
    mc.eval()
    assert _step(mc, [111])[0] == [49]  # no row while away: the shared row
    mc.train()
    (row_back,), reset = _step(mc, [111])
    assert row_back in reset  # handed out afresh (the model resets it)
    assert int(mc._admitted_total) == 3


def test_eviction_interval_rounds_and_a_growing_batch_loses_no_id():
    mc = ManagedTable("t", 1000, eviction_policy("distance_lfu"), 3).train()
    assert _step(mc, [1, 2])[0] == [999, 999]  # step 1: no round yet, the shared row
    _step(mc, list(range(3, 300)))  # a much larger batch than the first: history grows
    rows, _ = _step(mc, [1])  # step 3: round, all 299 ids of the three steps admitted
    assert mc.occupied() == 299 and rows != [999]


# --------------------------------------------------------------------------- fast path == reference

_FIB = 0x9E3779B97F4A7C15


def _colliding_ids(n: int) -> torch.Tensor:
    """``n`` ids whose home slot in every IdIndex is slot 0 (``id * 0x9E37.. < 2**32``): one
    cluster as long as ``n`` - probe chains past the lookup limit, overflowing insertions."""
    inv = pow(_FIB, -1, 1 << 64)
    return torch.tensor([((k * inv) % (1 << 64)) - ((k * inv) % (1 << 64) >= 1 << 63) * (1 << 64)
                         for k in range(1, n + 1)], dtype=torch.int64)


def _pair(policy: str, zch: int, interval: int, ttl: int) -> tuple[ReferenceManagedTable, ManagedTable]:
    ref = ReferenceManagedTable("t", zch, eviction_policy(policy, fast=False), interval, ttl).train()
    return ref, ManagedTable("t", zch, eviction_policy(policy), interval, ttl).train()


def _assert_same_step(ref: ReferenceManagedTable, new: ManagedTable, ids: torch.Tensor, fused: bool,
                      local: slice | None = None) -> None:
    """One training step on both: the same rows (of ``ids[local]``), rows handed out and state."""
    jt = {"t": JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))}
    ref.profile(jt)
    mine = ids if local is None else ids[local]
    want = ref.remap({"t": JaggedTensor(values=mine, lengths=torch.tensor([mine.numel()]))})["t"].values()
    if fused:
        got = new.record_and_remap(ids, local)
    else:
        new.profile(jt)
        got = new.remap({"t": JaggedTensor(values=mine, lengths=torch.tensor([mine.numel()]))})["t"].values()
    assert torch.equal(got, want)
    a, b = ref.evict(), new.evict()
    assert (a is None) == (b is None) and (a is None or torch.equal(a.long(), b.long()))
    sa, sb = ref.state_dict(), new.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("policy,interval,ttl", [("distance_lfu", 1, 0), ("distance_lfu", 3, 4), ("lru", 1, 3),
                                                 ("lru", 2, 0), ("lfu", 1, 0), ("lfu", 4, 0)])
def test_fast_managed_table_equals_the_reference(policy, interval, ttl):
    """ManagedTable (hash index, hit counts, merge re-sort, kthvalue selection) against
    ReferenceManagedTable (TorchRec's searchsorted / unique / argsort path): the same rows,
    the same handed-out rows in the same order, the same state after every step, through
    admission, eviction and TTL expiry, on ids over the whole int64 range (negatives too) and
    ids built to collide in the index (probe chains past the lookup limit, overflowing
    insertions), via profile + remap and via the fused record_and_remap."""
    g = torch.Generator().manual_seed(interval * 7 + ttl)
    pool = torch.cat([_colliding_ids(120), torch.randint(-(2**63), 2**63 - 1, (700,), generator=g),
                      torch.tensor([-(2**63), -1, 0, 1, 2**63 - 2])])  # the first steps draw from pool[:200]
    for fused in (False, True):
        ref, new = _pair(policy, 300, interval, ttl)
        for step in range(24):
            size = int(torch.randint(1, 400, (1,), generator=g))  # ids per step vary (and outnumber rows)
            ids = pool[torch.randint(0, pool.numel() if step > 3 else 200, (size,), generator=g)]
            _assert_same_step(ref, new, ids, fused)
        assert int(new._evicted_total) > 0 and (ttl == 0 or policy == "lfu" or int(new._expired_total) > 0)
    assert new._index is not None and new._index.overflow > 0  # the colliding ids overflowed


def test_fast_managed_table_resumes_and_serves_ranks_like_the_reference():
    """A state loaded mid-run (the index is rebuilt from the buffers), moved with .to(), and
    the multi-rank form (all ranks' ids recorded, this rank's slice mapped) stay equal."""
    g = torch.Generator().manual_seed(5)
    pool = torch.randint(-(2**62), 2**62, (900,), generator=g)
    ref, new = _pair("distance_lfu", 257, 1, 0)
    for step in range(30):
        ids = pool[torch.randint(0, pool.numel(), (300,), generator=g)]
        if step == 12:  # resume: a fresh table loads the state (its index is built on first use)
            state = new.state_dict()
            new = ManagedTable("t", 257, eviction_policy("distance_lfu"), 1).train()
            new.load_state_dict(state)
        if step == 20:
            new = new.to("cpu")
            new._mch_sorted_raw_ids.data = new._mch_sorted_raw_ids.data.clone()  # a swapped buffer, as .to() gives
        _assert_same_step(ref, new, ids, fused=True, local=slice(100, 200) if step % 2 else None)
    # In place, behind the index's back (what DCP's load does): detected, rebuilt.
    new.eval()
    ref.eval()
    new._mch_sorted_raw_ids.copy_(ref._mch_sorted_raw_ids)
    ids = pool[:300]
    assert torch.equal(new.lookup(ids), ref.remap({"t": JaggedTensor(values=ids, lengths=torch.tensor([300]))})["t"]
                       .values())


def test_kth_selection_equals_torchrec_argsort_selection():
    from torchrec.modules.mc_modules import DistanceLFU_EvictionPolicy

    from embeddings.id_mapping import FastDistanceLFU

    g = torch.Generator().manual_seed(2)
    fast, slow = FastDistanceLFU(), DistanceLFU_EvictionPolicy()
    for pivot, extra, levels in ((50, 0, 5), (50, 30, 3), (200, 150, 1), (7, 40, 2), (1000, 10, 1000)):
        scores = torch.randint(0, levels, (pivot + extra,), generator=g).double() / 3  # many ties
        for a, b in zip(fast._compute_selected_eviction_and_replacement_indices(pivot, scores),
                        slow._compute_selected_eviction_and_replacement_indices(pivot, scores)):
            assert torch.equal(a, b)


def test_id_index_lookups_stay_exact_through_inserts_deletes_and_rebuilds():
    from embeddings.id_index import IdIndex

    g = torch.Generator().manual_seed(4)
    universe = torch.cat([torch.randint(-(2**63), 2**63 - 1, (400,), generator=g), _colliding_ids(90)])
    cap = 120
    index, held = IdIndex(cap, cap), {}

    def fallback(x: torch.Tensor) -> torch.Tensor:  # the authoritative answer (the sorted array's role)
        return torch.tensor([held.get(int(v), cap) for v in x], dtype=torch.int64)

    held.update(zip(universe[400:].tolist(), range(90)))  # one cluster of 90 > MAX_PROBES: some overflow
    index.insert(universe[400:], torch.arange(90))
    assert index.overflow == 90 - 64
    for step in range(80):
        gone = [k for k in held if torch.rand(1, generator=g) < 0.3]
        index.delete(torch.tensor(gone, dtype=torch.int64))
        for k in gone:
            del held[k]
        free = sorted(set(range(cap)) - set(held.values()))
        new = [k for k in dict.fromkeys(universe[torch.randperm(universe.numel(), generator=g)[:60]].tolist())
               if k not in held][:len(free)]
        held.update(zip(new, free))
        index.insert(torch.tensor(new, dtype=torch.int64), torch.tensor(free[:len(new)], dtype=torch.int64))
        if index.too_full():
            index.clear()
            index.insert(torch.tensor(list(held), dtype=torch.int64), torch.tensor(list(held.values())))
        assert torch.equal(index.lookup(universe, fallback), fallback(universe)), step


def test_reserved_id_is_refused():
    cfg = load_config(None, [MAPPING, "model.name=base"])
    from cdp_rec.models import build_model

    model = build_model(cfg)
    kjt = KeyedJaggedTensor(keys=["item_id"], values=torch.tensor([EMPTY]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="reserved"):
        model.id_mapper(kjt)


def test_admitted_rows_start_from_row_init_with_zero_optimizer_state():
    """Unsharded: the rows a step hands to new ids (here: after evictions) are reset before the
    step's lookup - weights to row_init, the row-lazy Adam moments to zero."""
    from cdp_rec.models import build_model
    from cdp_rec.training.optim import build_optimizers
    from embeddings.id_mapping import attach_optimizer

    cfg = load_config(None, ["model.name=base", "features.id_mapping={item: managed}", "features.num_items=40"])
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizers(model, cfg.train)
    attach_optimizer(model, opt)
    weight = model.ebc.embedding_bags["item"].weight
    from bench._common import synthetic_batches

    checked = 0
    for batch in synthetic_batches(JobConfig().features, 32, 8, 6, seed=3):  # ids from 5000 items, 39 rows
        mc = model.id_mapper.managed["item"]
        held_before = mc.id_rows()[0]
        prepared = model.prepare_batch(batch)
        held, rows = mc.id_rows()
        fresh = rows[~torch.isin(held, held_before)]
        if held_before.numel() and fresh.numel():
            assert torch.equal(weight.detach()[fresh], row_init("item", fresh, 16, 40))
            state = opt.state[weight]
            assert float(state["exp_avg"][fresh].abs().sum()) == 0
            assert float(state["exp_avg_sq"][fresh].abs().sum()) == 0
            checked += 1
        loss, _ = model(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert checked >= 3 and int(model.id_mapper.managed["item"]._evicted_total) > 0


def test_a_table_built_on_meta_materialises_as_an_empty_table():
    from cdp_rec.models import build_model

    cfg = load_config(None, ["model.name=base", MAPPING])
    fresh = build_model(cfg).id_mapper.state_dict()
    meta = build_model(cfg, device="meta")
    mapper = meta.id_mapper.to_empty(device="cpu")  # what DistributedModelParallel does (zeros or garbage)
    mapper.materialize()
    got = mapper.state_dict()
    assert got.keys() == fresh.keys()
    for k in fresh:
        assert torch.equal(got[k], fresh[k]), k


# --------------------------------------------------------------------------- config, loader, generator


def test_config_refuses_unknown_tables_and_bad_choices():
    with pytest.raises(ConfigError, match="features.id_mapping.itm names an unknown table"):
        load_config(None, ["features.id_mapping.itm=hash"])
    with pytest.raises(ConfigError, match="features.id_mapping.item must be one of"):
        load_config(None, ["features.id_mapping.item=murmur"])
    with pytest.raises(ConfigError, match="data.id_churn needs data.raw_ids"):
        load_config(None, ["data.id_churn=0.1"])
    with pytest.raises(ConfigError, match="ttl_steps needs an eviction_policy"):
        load_config(None, ["features.zch.ttl_steps=5", "features.zch.eviction_policy=lfu"])


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    from cdp_rec.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("raw") / "data"
    generate_dataset(load_config(None, [*SMALL, "data.raw_ids=true", "data.id_churn=0.2", "data.train_days=3"]), root)
    return root


def _write_one(tmp: Path, cfg: JobConfig, **changes) -> Path:
    files = list_day_files(_write_one.root, 0)  # type: ignore[attr-defined]
    t = pq.read_table(files[0]).slice(0, 20)
    for name, col in changes.items():
        t = t.set_column(t.schema.get_field_index(name), name, col(t))
    path = tmp / "part-00000.parquet"
    pq.write_table(t, path)
    return path


def test_loader_accepts_any_int64_for_raw_tables_and_keeps_dense_checks(raw_root, tmp_path):
    _write_one.root = raw_root  # type: ignore[attr-defined]
    raw = load_config(None, [MAPPING]).features
    n = len(list(ParquetBatchReader(list_day_files(raw_root, 1), raw, 256)))
    assert n > 0
    neg = lambda t: pa.array(-t.column("item_id").to_numpy() - 1)  # noqa: E731
    path = _write_one(tmp_path, JobConfig(), item_id=neg)
    (batch,) = ParquetBatchReader([path], raw, 64)
    assert int(batch.sparse["item_id"].values().max()) < 0
    # Dense tables still range-check (the raw user ids are out of [0, 2000)).
    with pytest.raises(DataError, match=r"column 'user_id': 20 value\(s\) out of range \[0, 2000\)"):
        list(ParquetBatchReader([path], JobConfig().features, 64))
    # The one reserved value, a float column and a null are clear errors naming the column.
    path = _write_one(tmp_path, JobConfig(), item_id=lambda t: pa.array(np.full(t.num_rows, 2**63 - 1)))
    with pytest.raises(DataError, match=r"column 'item_id': 20 value\(s\) equal to 9223372036854775807"):
        list(ParquetBatchReader([path], raw, 64))
    path = _write_one(tmp_path, JobConfig(), item_id=lambda t: pa.array(t.column("item_id").to_numpy().astype(float)))
    with pytest.raises(DataError, match="column 'item_id' has type double, expected int64"):
        list(ParquetBatchReader([path], raw, 64))
    path = _write_one(tmp_path, JobConfig(), item_id=lambda t: pa.array([None] + t.column("item_id").to_pylist()[1:],
                                                                         pa.int64()))
    with pytest.raises(DataError, match="column 'item_id': 1 null value"):
        list(ParquetBatchReader([path], raw, 64))


def test_generator_raw_ids_and_churn(raw_root):
    from cdp_rec.data import raw_ids

    x = np.arange(100_000, dtype=np.int64)
    s = raw_ids.scramble62(x, "item")
    assert len(np.unique(s)) == len(x) and s.min() >= 0 and s.max() < 2**62
    items = [np.concatenate([pq.read_table(f, columns=["item_id"]).column(0).to_numpy()
                             for f in list_day_files(raw_root, d)]) for d in range(4)]
    # Day-0 ids are the scrambled slots; a slot keeps its day-0 id until it relaunches (20% a day).
    day0_ids = raw_ids.scramble62(np.arange(5000), "item")
    assert np.isin(items[0], day0_ids).all()
    kept = [float(np.isin(items[d], day0_ids).mean()) for d in range(1, 4)]
    assert all(abs(k - 0.8**d) < 0.1 for d, k in enumerate(kept, 1)), kept
    items = [set(x.tolist()) for x in items]
    spec = json.loads((raw_root / "_dataset.json").read_text())
    assert spec["data"]["raw_ids"] is True and spec["data"]["id_churn"] == 0.2
    assert "id_mapping" not in spec["features"]
    # A history keeps the id its item had on the behaviour's day: day-3 rows show older ids too.
    hist = set(np.concatenate([pq.read_table(f, columns=[HIST_ITEMS]).column(0).combine_chunks().flatten()
                               .to_numpy() for f in list_day_files(raw_root, 3)]).tolist())
    assert hist - items[3] and hist & items[0]


# --------------------------------------------------------------------------- the zoo on raw ids


MAPPING_2 = "features.id_mapping={item: hash, user: hash, query: managed, category: managed, ctx_hour: hash}"


@pytest.mark.parametrize("mapping", [MAPPING, MAPPING_2], ids=["item-managed", "category-managed"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_zoo_model_trains_on_raw_ids(raw_root, name, mapping):
    from cdp_rec.models import build_model
    from cdp_rec.training.optim import build_optimizers

    cfg = load_config(None, [mapping, f"model.name={name}", "features.num_items=400", "model.top_k=8",
                             "model.attention_len=8"])
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizers(model, cfg.train)
    reader = ParquetBatchReader(list_day_files(raw_root, 2), cfg.features, 128)
    for i, batch in zip(range(3), reader):
        prepared = model.prepare_batch(batch)
        loss, out = model(prepared)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mapper = getattr(model, "id_mapper", None)
    if mapper is None:  # lr_counts keeps item / user / query / category out of its tables
        return
    rows = prepared.sparse.to_dict()
    raw = batch.sparse.to_dict()
    for key, table in mapper.feature_table.items():
        if key in rows:
            v = rows[key].values()
            assert v.numel() == 0 or (v.min() >= 0 and v.max() < mapper.specs[table].num_rows), key
    if "item" in mapper.managed:
        # One lookup for the target and the history: same raw id, same row.
        held_ids, held_rows = mapper.managed["item"].id_rows()
        lookup = dict(zip(held_ids.tolist(), held_rows.tolist()))
        shared = mapper.specs["item"].num_rows - 1
        expected = {k: raw[k].values() for k in ("item_id", HIST_ITEMS)}
        if "hist_match_item_ids" in rows:  # CDP: the category filter ran on the raw ids
            from embeddings.pooling import filter_history_by_category

            expected["hist_match_item_ids"], _ = filter_history_by_category(
                raw[HIST_ITEMS].values(), raw[HIST_CATEGORIES].values(), raw[HIST_ITEMS].lengths(),
                raw["category_id"].values())
        checked = 0
        for key, values in expected.items():
            if mapper.feature_table.get(key) == "item" and key in rows:
                assert rows[key].values().tolist() == [lookup.get(r, shared) for r in values.tolist()], key
                checked += 1
        assert checked >= 1
        stats = mapper.table_stats()["item"]
        assert stats["occupied"] <= 399 and stats["admitted_total"] >= stats["occupied"]
    elif mapper.specs.get("item") is not None:  # hash: the stateless function, target and history alike
        for key in ("item_id", HIST_ITEMS):
            if mapper.feature_table.get(key) == "item" and key in rows:
                assert torch.equal(rows[key].values(), hash_rows(raw[key].values(), 400)), key


def test_category_filter_runs_on_raw_category_ids():
    """CDP's filter compares raw category ids (exact whatever the mapping), even ids that a
    hash would put on one row and ids at the ends of the int64 range."""
    from embeddings.pooling import filter_history_by_category

    cats = torch.tensor([-(2**63), 2**63 - 2, 7, -(2**63), 2**63 - 2, 7], dtype=torch.int64)
    items = torch.arange(6)
    vals, counts = filter_history_by_category(items, cats, torch.tensor([3, 3]), torch.tensor([2**63 - 2, -(2**63)]))
    assert vals.tolist() == [1, 3] and counts.tolist() == [1, 1]


# --------------------------------------------------------------------------- training runs


def _run(root: Path, run_dir: Path, name: str, *extra: str) -> dict:
    from cdp_rec.training.trainer import train

    cfg = load_config(None, [*SMALL, "data.raw_ids=true", "data.id_churn=0.2", "data.train_days=3", f"data.root={root}",
                             MAPPING, "features.num_items=600", "model.name=base", f"train.run_dir={run_dir}",
                             f"train.run_name={name}", "train.batch_size=128", "train.epochs=1", *extra])
    return train(cfg).metrics


def test_multi_day_run_reports_per_day_and_survives_a_small_managed_table(raw_root, tmp_path):
    m = _run(raw_root, tmp_path, "r")
    days = m["id_mapping_days"]
    assert [d["day"] for d in days] == [0, 1, 2]
    item = [d["tables"]["item"] for d in days]
    # 600 rows for ~1.4 x 5000 distinct items over the run: full, and evicting every day.
    assert item[0]["occupied"] == 599 and all(t["evicted"] > 0 for t in item[1:])
    occupied = 0
    for t in item:  # every admission fills a free row or displaces a held id
        assert t["occupied"] - occupied == t["admitted"] - t["evicted"] - t["expired"]
        occupied = t["occupied"]
    assert all(d["tables"]["query"]["shared_rows"] >= 0 for d in days)
    assert days[0]["samples_old_items"] == 0 and days[1]["samples_new_items"] > 0
    assert all(d["auc_new_items"] is not None for d in days[1:])
    assert np.isfinite(m["auc"])


@pytest.mark.slow
def test_resume_with_managed_tables_equals_uninterrupted(raw_root, tmp_path):
    from cdp_rec.training.checkpoint import list_checkpoints, load_unsharded

    full = _run(raw_root, tmp_path, "full", "checkpoint.every_steps=10")
    _run(raw_root, tmp_path, "cut", "checkpoint.every_steps=10", "train.max_steps=33")
    cut = _run(raw_root, tmp_path, "cut", "checkpoint.every_steps=10")
    assert cut["resumed_from_step"] == 33
    for k in ("auc", "logloss", "num_train_samples"):
        assert full[k] == cut[k], k
    # The per-day report too: the checkpoint carries the finished days, the seen items and
    # the unfinished day (step 33 is inside day 1), so day 1 is not "every item new".
    assert cut["id_mapping_days"] == full["id_mapping_days"]
    assert [d["day"] for d in full["id_mapping_days"]] == [0, 1, 2]
    assert full["id_mapping_days"][1]["samples_old_items"] > 0
    a, _ = load_unsharded(list_checkpoints(tmp_path / "full" / "checkpoints")[-1])
    b, _ = load_unsharded(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1])
    sa, sb = a.state_dict(), b.state_dict()
    assert any(".id_mapper.managed.item._mch_sorted_raw_ids" in f".{k}" for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _resume_worker(rank: int, ports: list[int], jobs: list[tuple[str, list[str]]], root: str, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2")
    for port, (name, extra) in zip(ports, jobs):
        os.environ["MASTER_PORT"] = str(port)
        _run(Path(root), Path(run_dir), name, *extra)


@pytest.mark.slow
def test_two_rank_resume_with_managed_tables_equals_uninterrupted(raw_root, tmp_path):
    """2 gloo ranks (item / user managed and row_wise, query hash table_wise), 600-row item
    table evicting every day: cut at step 33 (inside day 1) and resumed == uninterrupted,
    weights, optimizer-visible tables, the mapping and the per-day report included."""
    shard = ["sharding.constraints={item: row_wise, user: row_wise, query: table_wise}", "checkpoint.every_steps=10"]
    jobs = [("full2", shard), ("cut2", [*shard, "train.max_steps=33"]), ("cut2", shard)]
    mp.spawn(_resume_worker, args=([free_port() for _ in jobs], jobs, str(raw_root), str(tmp_path)), nprocs=2,
             join=True)
    full, cut = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("full2", "cut2"))
    assert cut["resumed_from_step"] == 33 and full["world_size"] == cut["world_size"] == 2
    for k in ("auc", "logloss", "num_train_samples", "id_mapping_days"):
        assert full[k] == cut[k], k
    assert sum(d["tables"]["item"]["evicted"] for d in full["id_mapping_days"]) > 0
    from cdp_rec.training.checkpoint import list_checkpoints, load_unsharded

    a, _ = load_unsharded(list_checkpoints(tmp_path / "full2" / "checkpoints")[-1])
    b, _ = load_unsharded(list_checkpoints(tmp_path / "cut2" / "checkpoints")[-1])
    sa, sb = a.state_dict(), b.state_dict()
    assert any(k.endswith("id_mapper.managed.item._mch_sorted_raw_ids") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_export_writes_the_mapping_beside_the_tables(raw_root, tmp_path):
    from cdp_rec.cli import main
    from cdp_rec.training.checkpoint import list_checkpoints, load_unsharded

    _run(raw_root, tmp_path, "e", "train.max_steps=12")
    ckpt = list_checkpoints(tmp_path / "e" / "checkpoints")[-1]
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "art")]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    model, _ = load_unsharded(ckpt)
    ids, rows = model.id_mapper.managed["item"].id_rows()
    pairs = np.load(tmp_path / "art" / "tables" / "item.ids.npy")
    assert pairs.shape == (ids.numel(), 2) and np.array_equal(pairs[:, 0], ids.numpy())
    assert np.array_equal(pairs[:, 1], rows.numpy())
    assert manifest["id_mapping"]["item"]["mapping"] == "managed"
    assert manifest["id_mapping"]["item"]["shared_row"] == 599
    assert manifest["id_mapping"]["query"]["mapping"] == "hash"
    # The export's tables and mapping score a raw id as the model does.
    weight = np.load(tmp_path / "art" / "tables" / "item.npy")
    raw_id = int(ids[3])
    row = int(pairs[np.searchsorted(pairs[:, 0], raw_id), 1])
    assert np.array_equal(weight[row], model.ebc.embedding_bags["item"].weight[row].detach().numpy())


# --------------------------------------------------------------------------- sharded (gloo)

STEPS, LOCAL_BS = 6, 64


def _dist_cfg(sharding: str) -> JobConfig:
    return load_config(None, [*SMALL, "model.name=base", "data.raw_ids=true", "data.id_churn=0.1", MAPPING,
                              "features.num_items=300", "features.num_users=600",
                              f"sharding.constraints={{item: {sharding}, user: {sharding}, query: {sharding}}}"])


def _dist_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    from cdp_rec.training.checkpoint import Checkpointer, Position
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer
    from embeddings.id_mapping import reset_rows
    from embeddings.state import gather_full_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    ctx = init_from_env("cpu")
    try:
        for sharding in ("table_wise", "row_wise"):
            cfg = _dist_cfg(sharding)
            halves = []
            for r in range(2):
                reader = ParquetBatchReader(list_day_files(root, 0), cfg.features, LOCAL_BS, rank=r, world_size=2)
                halves.append([b for _, b in zip(range(STEPS), reader)])
            batches = [Batch.concat([halves[0][k], halves[1][k]]) for k in range(STEPS)] if world == 1 else halves[rank]
            trainer = Trainer(cfg, ctx)
            trainer.train_steps(batches, lambda out: None)
            state = gather_full_state(trainer.module)
            stats = trainer.model.id_mapper.table_stats()
            # Rows handed to new ids are reset in this rank's shards (weights and rowwise momentum).
            rows = torch.tensor([0, 7, 150, 298])

            def momentum() -> float:  # rowwise Adagrad state of ``rows``, summed over all ranks' shards
                total = 0.0
                state = trainer.module.fused_optimizer.state_dict()["state"]
                for t in state.get("ebc.embedding_bags.item.weight", {}).values():
                    for s in t.local_shards():
                        lo = s.metadata.shard_offsets[0]
                        total += float(s.tensor[rows[(rows >= lo) & (rows < lo + s.tensor.shape[0])] - lo].abs().sum())
                totals: list = [None] * world
                dist.all_gather_object(totals, total)
                return sum(totals)

            before = momentum()
            reset_rows(trainer.model, "item", rows)
            after = gather_full_state(trainer.module)
            momentum = [before, momentum()]
            if sharding == "row_wise" and world == 2:
                ckpt = Path(out) / "ck" / "step-000000006"
                Checkpointer(ckpt.parent, 2).save(trainer, Position(STEPS, STEPS * 128), {"local_batch_size": LOCAL_BS})
            if rank == 0:
                torch.save({"state": state, "stats": stats, "reset": after["ebc.embedding_bags.item.weight"][rows],
                            "momentum": momentum}, Path(out) / f"{sharding}-w{world}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_with_managed_tables_and_reshard_to_one_process(tmp_path):
    from cdp_rec.data.synthetic import generate_dataset
    from cdp_rec.training.checkpoint import load_unsharded

    root = tmp_path / "data"
    gen = _dist_cfg("table_wise")
    gen.features.num_items = 5000  # the data's vocabulary; the managed table has 300 rows
    generate_dataset(gen, root)
    for world in (1, 2):
        mp.spawn(_dist_worker, args=(world, free_port(), str(root), str(tmp_path)), nprocs=world, join=True)
    for sharding in ("table_wise", "row_wise"):
        one, two = (torch.load(tmp_path / f"{sharding}-w{w}.pt", weights_only=False) for w in (1, 2))
        assert one["stats"] == two["stats"]
        assert two["stats"]["item"]["evicted_total"] > 0  # the 300-row table overflowed
        assert one["state"].keys() == two["state"].keys()
        for key, a in one["state"].items():
            torch.testing.assert_close(two["state"][key], a, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{sharding} {key}: {m}")
        expect = row_init("item", torch.tensor([0, 7, 150, 298]), 16, 300)
        assert torch.equal(two["reset"], expect)
        assert two["momentum"][0] > 0 and two["momentum"][1] == 0, two["momentum"]
    # 2 ranks (row_wise) -> 1 unsharded process: the mapping comes along, bit for bit.
    model, _ = load_unsharded(tmp_path / "ck" / "step-000000006")
    saved = torch.load(tmp_path / "row_wise-w2.pt", weights_only=False)["state"]
    loaded = model.state_dict()
    for key in saved:
        if ".id_mapper." in key:
            assert torch.equal(loaded[key], saved[key]), key
    mc = model.id_mapper.managed["item"].eval()
    ids, rows = mc.id_rows()
    got = mc.remap({"item": JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))})["item"].values()
    assert torch.equal(got, rows)


def test_plan_counts_the_mapping_state_per_table_and_rank():
    from embeddings.capacity import format_report, plan_capacity

    cfg = load_config(None, [MAPPING])
    report = plan_capacity(cfg, 2, 2)
    t = {x.name: x for x in report.tables}
    # managed: sorted ids, rows, count, last seen (int64 each) + the fixed small buffers,
    # + the hash index (2 slots of id + row per row) and the interval's hit count per row
    assert t["item"].id_mapping == "managed" and t["item"].mapping_state_bytes == 5000 * (32 + 32 + 8) + 1029 * 8
    # history bound: global batch 256 x (item_id + 50 filtered history ids) x interval 1 x 1.25, id + step,
    # + the lookup's scratch and output per id
    assert t["item"].mapping_bytes - t["item"].mapping_state_bytes == int(256 * 51 * 1.25) * 16 + 256 * 51 * 34
    assert t["query"].id_mapping == "hash" and t["query"].mapping_bytes == 500 * 9
    assert t["ctx_hour"].id_mapping == "dense" and t["ctx_hour"].mapping_bytes == 0
    per_rank = sum(x.mapping_bytes for x in report.tables)
    assert all(r.mapping_ddr == per_rank and r.ddr == r.planner_ddr + r.optimizer_ddr + per_rank for r in report.ranks)
    text = format_report(report)
    assert "raw-id mapping (features.id_mapping)" in text and "ids item             managed  4,999 ids max" in text


def test_a_mapping_that_cannot_fit_fails_before_training_naming_the_table():
    """Each rank holds the whole mapping: a managed table too large for a rank's memory is
    refused by the start-up check of a sharded run (the same as ``cdp-rec plan``), naming it."""
    from cdp_rec.training.trainer import preflight_capacity
    from embeddings.capacity import CapacityError

    cfg = load_config(None, ["features.id_mapping={item: managed, query: hash}", "features.num_items=40000000",
                             "sharding.ddr_gb=4"])
    with pytest.raises(CapacityError, match=r"raw-id mapping [\d.]+ GiB on every rank.*item managed [\d.]+ GiB"):
        preflight_capacity(cfg, 2, 2)


def test_joined_layout_gives_the_same_raw_ids_as_rows(tmp_path):
    from cdp_rec.data.joined import open_reader
    from cdp_rec.data.synthetic import generate_dataset

    over = [*SMALL, "data.raw_ids=true", "data.id_churn=0.2", "data.train_days=2", MAPPING]
    cfg_rows = load_config(None, over)
    cfg_joined = load_config(None, [*over, "data.layout=joined", "data.num_user_buckets=4"])
    generate_dataset(cfg_rows, tmp_path / "rows")
    generate_dataset(cfg_joined, tmp_path / "joined")

    def rows_of(batches):
        out = {}
        for b in batches:
            d = b.sparse.to_dict()
            off = torch.cat([torch.zeros(1, dtype=torch.int64), d[HIST_ITEMS].lengths().cumsum(0)])
            for i, rid in enumerate(b.request_ids.tolist()):
                key = (rid, int(d["item_id"].values()[i]))
                out.setdefault(key, []).append(tuple(d[HIST_ITEMS].values()[off[i]:off[i + 1]].tolist()))
        return {k: sorted(v) for k, v in out.items()}

    a = rows_of(ParquetBatchReader(list_day_files(tmp_path / "rows", 2), cfg_rows.features, 500))
    b = rows_of(open_reader(cfg_joined, tmp_path / "joined", 2, 500))
    assert a == b and len(a) > 1000


def test_binned_auc_matches_the_exact_auc():
    from cdp_rec.metrics import auc
    from cdp_rec.training.id_report import BINS, binned_auc

    g = torch.Generator().manual_seed(0)
    p = torch.rand(20_000, generator=g, dtype=torch.float64)
    y = torch.rand(20_000, generator=g, dtype=torch.float64) < p
    bins = (p * BINS).long()
    pos = torch.bincount(bins[y], minlength=BINS).double()
    neg = torch.bincount(bins[~y], minlength=BINS).double()
    assert abs(binned_auc(pos, neg) - auc(p.numpy(), y.numpy().astype(np.int8))) < 1e-3


def test_hash_collision_statistics_are_exact():
    from embeddings.id_mapping import HashStats

    stats = HashStats(50)
    g = torch.Generator().manual_seed(0)
    seen: set[int] = set()
    for _ in range(5):
        ids = torch.randint(-(10**12), 10**12, (30,), generator=g)
        ids = torch.cat([ids, ids[:10]])  # repeats within a step
        stats.update(ids, 50)
        seen |= set(ids.tolist())
    by_row: dict[int, set[int]] = {}
    for i in seen:
        by_row.setdefault(int(hash_rows(torch.tensor([i]), 50)), set()).add(i)
    assert stats.occupied() == len(by_row)
    assert stats.shared_rows() == sum(len(v) > 1 for v in by_row.values())
    assert all(int(stats.owner[r]) == min(v) for r, v in by_row.items())
