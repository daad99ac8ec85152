"""Benchmark: the cost of mapping raw ids to rows (dense / hash / managed) against the lookup itself.

Run ``.venv/bin/python bench/id_mapping.py`` (full: B=4096, L=200 and 2000, 1M x 64 item
table; a few minutes) or ``--quick`` (B=512, L=200, 100k rows; seconds). One process, all
cases in one run.

Per case (B impressions, L history items each, so ``N = B * (1 + L)`` item ids per batch:
the target and the whole history are mapped, as for the ``base`` model):

* ``lookup``: TorchRec's ``EmbeddingBagCollection`` forward (MEAN pooling) of the item
  table over the batch's rows, and forward + backward with a sparse table gradient;
* ``dense``: ids are rows already; the only work is the loader's range check (numpy,
  ``(v < 0) | (v >= N)`` over the ids);
* ``hash``: :class:`embeddings.id_mapping.IdMapper` with the item table ``hash``
  (``splitmix64(id) mod rows``), statistics off, and ``hash+stats`` with
  ``features.hash_collision_stats`` (unique ids, owner scatter per step);
* ``managed/1``, ``managed/10``: the item table ``managed`` (TorchRec MCH, DistanceLFU)
  with ``eviction_interval`` 1 and 10, as training runs it
  (:class:`embeddings.id_mapping.ManagedTable`): per step every id is looked up in the
  hash index beside the sorted id table, held ids add to their row's count, the others
  (misses) go to the history; every interval a round admits / evicts (a sort of the
  misses only, the policy's selection, a merge into the sorted table, index updates),
  then the ids whose row the round changed are looked up again. Timed in steady state:
  the table (rows = the item table's) is first filled from a universe of 2x its rows, so
  rounds evict. The per-step median of ``managed/10`` excludes the round;
  ``amortised_ms`` spreads the round's cost over its 10 steps;
* ``managed-ref/1`` (full run only): the same mapping computed by TorchRec's own path
  (:class:`embeddings.id_mapping.ReferenceManagedTable`: searchsorted per id, a
  ``torch.unique`` of every id of the round, full argsorts), interval 1 - the speed-up
  of the fast path, measured in the same run.

Raw ids are 62-bit (a scramble of Zipf-distributed dense ids, 2x the table's rows, so a
managed table is always full and evicting). Reported: median ms per batch and the ratio
to the lookup's forward (and forward + backward).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402


def _ids(n: int, universe: int, g) -> "object":
    import torch

    from cdp_rec.data.raw_ids import scramble62

    # Zipf-ish popularity over the universe: rank r drawn with p ~ 1 / (r + 1).
    u = torch.rand(n, generator=g, dtype=torch.float64)
    dense = (torch.exp(u * torch.log(torch.tensor(float(universe + 1)))) - 1).long().clamp_(0, universe - 1)
    return torch.from_numpy(scramble62(dense.numpy(), "item"))


CASES = ("lookup_fwd", "lookup_fwd_bwd", "dense", "hash", "hash+stats", "managed/1", "managed/10", "managed-ref/1")


def _reference_step(mc, ids):
    """TorchRec's profile-then-remap of one step's ids on a ReferenceManagedTable (rows [n])."""
    import torch
    from torchrec import JaggedTensor

    jt = {"item": JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))}
    mc.profile(jt)
    return mc.remap(jt)["item"].values()


def run_case(B: int, L: int, rows: int, dim: int, reps: int, seconds: float, with_reference: bool = False) -> dict:
    import numpy as np
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

    from cdp_rec.config import ZchConfig
    from embeddings.id_mapping import IdMapper, MappedTable, ReferenceManagedTable, eviction_policy

    g = torch.Generator().manual_seed(0)
    keys = ["item_id", "hist_item_ids"]
    lengths = torch.cat([torch.ones(B, dtype=torch.int64), torch.full((B,), L, dtype=torch.int64)])

    def batch() -> KeyedJaggedTensor:
        return KeyedJaggedTensor(keys=keys, values=_ids(B * (1 + L), 2 * rows, g), lengths=lengths)

    batches = [batch() for _ in range(6)]  # cycled: together more distinct ids than rows, so rounds evict
    table = MappedTable("item", "hash", rows, dim, tuple(keys))
    out: dict = {"batch": B, "seq_len": L, "rows": rows, "dim": dim, "ids_per_batch": B * (1 + L)}
    timing: dict[str, dict] = {}

    def timed(name: str, fn, per_batch: bool = True) -> None:
        i = [0]

        def call() -> None:
            fn(batches[i[0] % len(batches)])
            i[0] += 1

        call()  # warm-up
        ts = C.timed_reps(call, reps, 10 * reps, seconds)
        timing[name] = {"median_ms": round(1e3 * C.median(ts), 2), "min_ms": round(1e3 * min(ts), 2), "reps": len(ts)}

    # The lookup: MEAN-pooled EBC over the mapped rows (hash rows stand in for any mapping).
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="item", embedding_dim=dim, num_embeddings=rows,
                                                            feature_names=keys, pooling=PoolingType.MEAN)])
    ebc.embedding_bags["item"].sparse = True
    hasher = IdMapper([table], ZchConfig(), hash_collision_stats=False).train()
    mapped = [hasher(b) for b in batches]
    mi = [0]

    def lookup(_b, backward: bool = False) -> None:
        kjt = mapped[mi[0] % len(mapped)]
        mi[0] += 1
        pooled = ebc(kjt).values()
        if backward:
            pooled.sum().backward()
            ebc.embedding_bags["item"].weight.grad = None

    timed("lookup_fwd", lookup)
    timed("lookup_fwd_bwd", lambda b: lookup(b, True))

    def dense_check(b: KeyedJaggedTensor) -> None:
        v = np.asarray(b.values() % rows)
        bool(((v < 0) | (v >= rows)).any())

    timed("dense", dense_check)
    timed("hash", hasher)
    stats = IdMapper([table], ZchConfig(), hash_collision_stats=True).train()
    timed("hash+stats", stats)
    for interval, reference in ((1, False), (10, False), (1, True)):
        if reference and not with_reference:
            continue
        zch = ZchConfig(eviction_interval=interval)
        mapper = IdMapper([MappedTable("item", "managed", rows, dim, tuple(keys))], zch).train()
        if reference:  # TorchRec's own path in the same mapper: profile (all ids), then remap
            ref = ReferenceManagedTable("item", rows, eviction_policy("distance_lfu", fast=False), interval)
            ref.record_and_remap = lambda ids, local, mc=ref: _reference_step(mc, ids)  # type: ignore[attr-defined]
            mapper.managed["item"] = ref.train()
        mc = mapper.managed["item"]
        t0 = time.perf_counter()
        for b in batches * 2:  # fill: 2x rows of universe, so the table is full after a few rounds
            mapper(b)
        while mc.occupied() < rows - 1 or mc._current_iter % interval:
            mapper(batch())
        fill_s = time.perf_counter() - t0
        name = f"managed{'-ref' if reference else ''}/{interval}"
        if interval == 1:
            timed(name, mapper)
        else:
            # steps 1..interval-1 of a round (record + remap), then the round's step alone
            step_ts, round_ts = [], []
            for k in range(interval * max(1, reps)):
                b = batches[k % len(batches)]
                t = time.perf_counter()
                mapper(b)
                (round_ts if mc._current_iter % interval == 0 else step_ts).append(time.perf_counter() - t)
            timing[name] = {"median_ms": round(1e3 * C.median(step_ts), 2), "min_ms": round(1e3 * min(step_ts), 2),
                            "round_ms": round(1e3 * C.median(round_ts), 2), "reps": len(step_ts) + len(round_ts),
                            "amortised_ms": round(1e3 * (sum(step_ts) + sum(round_ts))
                                                  / (len(step_ts) + len(round_ts)), 2)}
        timing[name].update(fill_s=round(fill_s, 2), evicted=int(mc._evicted_total), occupied=mc.occupied())
    fwd, fwd_bwd = timing["lookup_fwd"]["median_ms"], timing["lookup_fwd_bwd"]["median_ms"]
    for name in [c for c in CASES[2:] if c in timing]:
        ms = timing[name].get("amortised_ms", timing[name]["median_ms"])
        timing[name]["vs_lookup_fwd"] = round(ms / fwd, 3)
        timing[name]["vs_lookup_fwd_bwd"] = round(ms / fwd_bwd, 3)
    out["timing"] = timing
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="B=512, L=200, 100k rows, a few reps (seconds)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    C.warn_if_loaded(torch.get_num_threads())
    if args.quick:
        cases = [dict(B=512, L=200, rows=100_000, dim=16, reps=3, seconds=0.5)]
    else:
        cases = [dict(B=4096, L=L, rows=1_000_000, dim=64, reps=3, seconds=3.0, with_reference=True)
                 for L in (200, 2000)]
    results = [run_case(**c) for c in cases]
    rows = []
    for r in results:
        t = r["timing"]
        for name in [c for c in CASES if c in t]:
            x = t[name]
            rows.append([r["batch"], r["seq_len"], f"{r['rows']:,}", name, x["median_ms"],
                         x.get("amortised_ms", ""), x.get("vs_lookup_fwd", ""), x.get("vs_lookup_fwd_bwd", "")])
    print(C.md_table(["B", "L", "rows", "case", "median ms", "amortised ms", "/ lookup fwd", "/ lookup fwd+bwd"], rows))
    C.write_json(args.json, {"bench": "id_mapping", "quick": args.quick, "threads": torch.get_num_threads(),
                             "load_avg": C.loadavg(), "results": results})


if __name__ == "__main__":
    main()
