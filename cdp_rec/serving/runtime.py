"""Score batches with a serving package: ``load_package(PKG).predict(batch)``.

What a call does, for ``B`` impressions (the loader's :class:`~cdp_rec.data.schema.Batch`,
raw ids as logged):

1. the model's data-side step on raw ids (what its ``prepare_batch`` does): nothing
   (``base``), CDP's category filter (behaviours of the target's category -> the
   ``hist_match_item_ids`` bag, :func:`embeddings.pooling.filter_history_by_category`),
   or SIM's category search (of those, the ``top_k`` most recent);
2. ids -> rows for every looked-up feature: ``dense`` tables range-checked (an id outside
   ``[0, rows)`` is a :class:`~cdp_rec.data.loader.DataError` naming the feature), ``hash``
   tables by :func:`embeddings.id_mapping.hash_rows`, ``managed`` tables by a binary search
   in the exported (raw id, row) pairs, unknown ids on the shared last row - the same
   rows TorchRec's managed-collision module gives in evaluation;
3. the lookups, by TorchRec's quantized inference modules
   (:class:`torchrec.quant.embedding_modules.EmbeddingBagCollection` for pooled features,
   ``EmbeddingCollection`` for SIM's unpooled behaviours) on fbgemm's CPU kernels, tables
   in fp32, fp16 or row-wise int8;
4. the dense graph (``torch.export`` program, or its AOTInductor build with
   ``native=True``) on the pooled embeddings -> logits ``[B]``; scores = sigmoid. A NaN /
   inf logit is a :class:`~cdp_rec.serving.package.PackageError` naming the package, never a score.

Loading cross-checks what the runtime acts on: the manifest's model, family, prep and
lookups against what ``export`` writes for that model and against ``config.json``'s
``model.name``; every table's mapping, rows and features against ``spec.json``'s feature
spec; ``dense.inputs`` against the lookups and against the exported program's own input
signature; table and dense weights are checked to be finite. A disagreement is a
PackageError naming both files / fields.

A request-deduplicated batch (``Batch.history_row``, what the loader emits with
``data.dedup_requests``: one copy of a request's history) is scored without expanding it:
the history bag is pooled once per request (base), filtered and pooled once per (request,
target category) (CDP), searched once per (request, target category) (SIM), and every row
takes its representative's result - the same ids in the same order, so the same scores bit
for bit (tests/test_serving.py).

Nothing here imports the training code (:mod:`cdp_rec.training`), the model classes
(:mod:`cdp_rec.models`) or the data generator; tests/test_serving.py loads a package with
those made unimportable.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cdp_rec.config import ConfigError, FeatureConfig, config_from_dict, table_size_fields
from cdp_rec.data.loader import DataError
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, RAW_ID_RESERVED, Batch, column_tables
from cdp_rec.serving.package import (
    SPEC,
    PackageError,
    listed,
    load_npy,
    read_json,
    read_manifest,
    verify_package,
)
from cdp_rec.serving.program import load_aoti, load_program

log = logging.getLogger(__name__)

DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}
# Bytes per embedding value in the quantized row (int8 rows also carry a 4-byte fp16 scale + bias).
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
FINITE_CHECK_ROWS = 1 << 16  # table rows checked for NaN / inf at a time
HIST_MATCH = "hist_match_item_ids"  # CDP's filtered history (cdp_rec.models.cdp.HIST_MATCH)
SEQ_ITEMS, SEQ_CATEGORIES = "seq_item_ids", "seq_category_ids"  # cdp_rec.models.sequence
PREP_KINDS = ("none", "category_filter", "category_search")
CONFIG = "config.json"  # the training config: its model.name is cross-checked against the manifest's model
# The looked-up feature -> the input column its ids come from (the runtime's data-side step makes them).
_DERIVED_COLUMNS = {HIST_MATCH: HIST_ITEMS, SEQ_ITEMS: HIST_ITEMS, SEQ_CATEGORIES: HIST_CATEGORIES}
# prep kind -> (family, the history features the lookups must hold: EBC / EC).
_PREP_SHAPES: dict[str, tuple[str, set[str], set[str]]] = {
    "none": ("pooled", {HIST_ITEMS}, set()),
    "category_filter": ("pooled", {HIST_MATCH}, set()),
    "category_search": ("sequence", set(), {SEQ_ITEMS, SEQ_CATEGORIES}),
}


def served_prep(model: str) -> str | None:
    """The prep kind ``export --serving`` writes for ``model`` (:func:`cdp_rec.serving.export.model_family`),
    or None for a model it does not export."""
    if model == "base":
        return "none"
    if model == "cdp" or model.startswith("cdp_no_"):
        return "category_filter"
    if model == "sim":
        return "category_search"
    return None


# ----------------------------------------------------------------------------- ids -> rows


@dataclass
class TableRows:
    """How one table's raw ids become rows (``features.id_mapping``)."""

    name: str
    kind: str  # dense | hash | managed
    rows: int
    held_ids: torch.Tensor | None = None  # managed: [n] raw ids, ascending
    held_rows: torch.Tensor | None = None  # managed: [n] their rows

    def map(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """``ids [N]`` int64 -> rows ``[N]`` int64; DataError naming ``feature`` for an id the table cannot take."""
        if ids.numel() == 0:
            return ids
        if self.kind == "dense":
            lo, hi = torch.aminmax(ids)
            if int(lo) < 0 or int(hi) >= self.rows:
                bad = (ids < 0) | (ids >= self.rows)
                first = int(ids[int(bad.nonzero()[0])])
                raise DataError(f"feature {feature!r}: {int(bad.sum())} id(s) out of range [0, {self.rows}) of the "
                                f"dense table {self.name!r}, first: {first}")
            return ids
        if bool((ids == RAW_ID_RESERVED).any()):
            raise DataError(f"feature {feature!r}: raw id {RAW_ID_RESERVED} (2**63 - 1) is reserved (TorchRec's "
                            f"empty-slot marker), table {self.name!r}")
        if self.kind == "hash":
            from embeddings.id_mapping import hash_rows

            return hash_rows(ids, self.rows)
        assert self.held_ids is not None and self.held_rows is not None
        shared = torch.full_like(ids, self.rows - 1)
        if self.held_ids.numel() == 0:
            return shared
        pos = torch.searchsorted(self.held_ids, ids).clamp_(max=self.held_ids.numel() - 1)
        return torch.where(self.held_ids[pos] == ids, self.held_rows[pos], shared)


# ----------------------------------------------------------------------------- the model


class ServingModel:
    """A loaded serving package. Use :func:`load_package`; then :meth:`predict`.

    Attributes:
        root: the package directory.
        manifest: its ``manifest.json``.
        features: the feature spec the inputs must satisfy (:class:`~cdp_rec.config.FeatureConfig`).
        model_name, dtype: what was exported (``cdp``, ``int8``, ...).
        dense_format: ``"exported"`` (the ``torch.export`` program) or ``"aoti"``.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], features: FeatureConfig,
                 tables: dict[str, TableRows], ebc: QuantEmbeddingBagCollection,
                 ec: QuantEmbeddingCollection | None, dense: Callable[..., Any], dense_format: str) -> None:
        self.root = root
        self.manifest = manifest
        self.features = features
        self.model_name: str = manifest["model"]
        self.dtype: str = manifest["dtype"]
        self.dense_format = dense_format
        self.prep: dict[str, Any] = manifest["prep"]
        self.family: str = manifest["family"]
        self._tables = tables
        self._feature_table = {f: t for t, spec in manifest["tables"].items() for f in spec["features"]}
        self._ebc, self._ec, self._dense = ebc, ec, dense
        self._ebc_features: list[str] = list(manifest["lookups"]["ebc"]["features"])
        self._ec_features: list[str] = list(manifest["lookups"].get("ec", {}).get("features", []))
        self._seq_len: int = int(manifest["lookups"].get("ec", {}).get("seq_len", 0))
        self._single = [f for f in self._ebc_features + self._ec_features
                        if f not in (HIST_ITEMS, HIST_MATCH, SEQ_ITEMS, SEQ_CATEGORIES)]
        # Columns of the pooled history bag (base: hist_item_ids, CDP: hist_match_item_ids) in the EBC output.
        dims = [manifest["tables"][self._feature_table[f]]["dim"] for f in self._ebc_features]
        starts = np.cumsum([0, *dims]).tolist()
        bag = next((i for i, f in enumerate(self._ebc_features) if f in (HIST_ITEMS, HIST_MATCH)), None)
        self._bag_columns = (starts[bag], starts[bag + 1]) if bag is not None else (0, 0)

    def __repr__(self) -> str:
        return (f"ServingModel({self.model_name}, {self.dtype} tables, {self.dense_format} dense graph, "
                f"{self.root})")

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def predict(self, batch: Any) -> torch.Tensor:
        """Click probabilities ``[B]`` float32 of a :class:`~cdp_rec.data.schema.Batch` (raw ids,
        KJT keys of :func:`cdp_rec.data.schema.sparse_keys`) or of a ``pyarrow.Table`` /
        ``RecordBatch`` in the training schema (validated like the loader's row groups)."""
        return torch.sigmoid(self.logits(batch))

    @torch.inference_mode()
    def logits(self, batch: Any) -> torch.Tensor:
        """Logits ``[B]`` float32 (see :meth:`predict`)."""
        if not isinstance(batch, Batch):
            import pyarrow as pa

            from cdp_rec.serving.predict import arrow_to_batch, check_id_maps

            if isinstance(batch, (pa.Table, pa.RecordBatch)):
                check_id_maps(self, [("batch", batch.schema)])
            batch = arrow_to_batch(batch, self.features)
        # Request-deduplicated batches (data.dedup_requests): row b's history is row share[b]'s
        # bag. The data-side step and the lookups then run once per request (CDP, SIM: once per
        # request and target category) and each row takes its representative's result.
        hr = getattr(batch, "history_row", None)
        hr = None if hr is None else hr.to(torch.int64)
        jt = batch.sparse.to_dict()
        missing = [k for k in (*self._single, HIST_ITEMS, HIST_CATEGORIES) if k not in jt]
        if missing:
            raise DataError(f"batch: no feature {missing[0]!r} (the package's model reads "
                            f"{sorted(set(self._single) | {HIST_ITEMS, HIST_CATEGORIES})})")
        single = {k: jt[k].values() for k in self._single}
        n = len(batch)
        hist, hist_cat = jt[HIST_ITEMS], jt[HIST_CATEGORIES]
        kind = self.prep["kind"]
        share = hr
        if kind == "none":
            seq = {HIST_ITEMS: (hist.values(), hist.lengths().to(torch.int64))}
            counts = seq[HIST_ITEMS][1]
        else:
            from embeddings.pooling import filter_history_by_category

            target = single["category_id"]
            if hr is None:
                values, counts = filter_history_by_category(hist.values(), hist_cat.values(), hist.lengths(), target)
            else:  # one filtered bag per (request history, target category), at its first row
                from cdp_rec.data.loader import gather_bags

                share = _first_row_of_pair(hr, target)
                reps = torch.nonzero(share == torch.arange(n)).squeeze(1)
                lengths, items, cats = gather_bags(hist.lengths(), hr[reps], hist.values(), hist_cat.values())
                values, rep_counts = filter_history_by_category(items, cats, lengths, target[reps])
                counts = torch.zeros(n, dtype=torch.int64).index_copy_(0, reps, rep_counts)
            if kind == "category_filter":
                seq = {HIST_MATCH: (values, counts)}
            else:  # category_search: SIM's GSU keeps the top_k most recent matches
                keep = _last_n_mask(counts, self._seq_len)
                values, counts = values[keep], counts.clamp(max=self._seq_len)
                cats = torch.repeat_interleave(target, counts, output_size=values.numel())
                seq = {SEQ_ITEMS: (values, counts), SEQ_CATEGORIES: (cats, counts)}
        ones = torch.ones(n, dtype=torch.int64)
        rows = {k: (self._rows(k, v), ones) for k, v in single.items()}
        rows.update({k: (self._rows(k, v), lengths) for k, (v, lengths) in seq.items()})

        pooled = self._ebc(_kjt(self._ebc_features, rows)).values()  # [B, sum of dims], manifest key order
        if self._ec is None:
            if share is not None:
                lo, hi = self._bag_columns
                pooled[:, lo:hi] = pooled[share, lo:hi]
                counts = counts[share]
            return self._finite(self._dense(pooled, counts))
        jts = self._ec(_kjt(self._ec_features, rows))
        k = self._seq_len
        seq_items = jts[SEQ_ITEMS].to_padded_dense(desired_length=k)  # [B, K, D]
        seq_cats = jts[SEQ_CATEGORIES].to_padded_dense(desired_length=k)
        if share is not None:
            seq_items, seq_cats, counts = seq_items[share], seq_cats[share], counts[share]
        return self._finite(self._dense(pooled, jts["item_id"].values(), jts["category_id"].values(), seq_items,
                                        seq_cats, counts))

    def _finite(self, logits: Any) -> torch.Tensor:
        """The dense graph's logits, refused if any is NaN / inf: the inputs are validated ids, so a
        non-finite score can only come from the package's weights - never hand it out as a score."""
        bad = ~torch.isfinite(logits)
        if bool(bad.any()):
            raise PackageError(f"{self.root}: the package scored {int(bad.sum())} of {logits.numel()} row(s) "
                               f"NaN / inf (first: row {int(bad.nonzero()[0, 0])}); its weights are not finite - "
                               "damaged or tampered (re-export it); no score is written")
        return logits

    def _rows(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        return self._tables[self._feature_table[feature]].map(feature, ids)


def _kjt(keys: list[str], parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=keys, values=torch.cat([parts[k][0] for k in keys]),
                             lengths=torch.cat([parts[k][1] for k in keys]))


def _first_row_of_pair(history_row: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
    """``[B]``: the first row with the same (history, target category) as each row
    (cdp_rec.models.cdp.first_row_of_pair, which CDP's deduplicated prepare_batch uses)."""
    pairs = torch.stack([history_row, category.to(torch.int64)], dim=1)  # [B, 2]
    _, group = torch.unique(pairs, dim=0, return_inverse=True)
    rows = torch.arange(len(group))
    first = torch.full((int(group.max()) + 1 if len(group) else 0,), len(group), dtype=torch.int64)
    return first.scatter_reduce(0, group, rows, reduce="amin")[group]


def _last_n_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``[N]`` bool: jagged values among the last ``n`` of their bag (cdp_rec.models.sequence.last_n_mask)."""
    lengths = lengths.to(torch.int64)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    total = int(offsets[-1])
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)
    pos = torch.arange(total) - offsets[seg]
    return pos >= (lengths[seg] - n)


# ----------------------------------------------------------------------------- loading


def load_package(path: str | Path, native: bool = False, expected_sha256: str | None = None) -> ServingModel:
    """Verify and load a serving package (see :mod:`cdp_rec.serving.package`).

    Args:
        path: the package directory (``cdp-rec export --serving --out``).
        native: run the AOTInductor-compiled dense graph if the package has one. It is a
            shared library: native code from the package runs. Default: the ``torch.export``
            program, read through an allow-list.
        expected_sha256: refuse the package unless ``manifest.json`` has this SHA-256 (the
            id ``export`` prints), which pins every file of it.

    Raises:
        PackageError: one line naming the file, for anything wrong with the package.
    """
    root = Path(path)
    manifest = read_manifest(root)
    verify_package(root, manifest, expected_sha256)
    _warn_on_other_versions(root, manifest)
    try:
        return _load(root, manifest, native)
    except (KeyError, TypeError, IndexError, AttributeError) as e:  # a manifest edited into another shape
        raise PackageError(f"{root / 'manifest.json'}: malformed ({type(e).__name__}: {e})") from e


def _warn_on_other_versions(root: Path, manifest: dict[str, Any]) -> None:
    """The exported program and the fbgemm table layout are read by this process's versions: say when they differ."""
    import importlib.metadata

    saved = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    for dist in ("torch", "torchrec", "fbgemm-gpu-cpu"):
        try:
            here = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist in saved and saved[dist] != here:
            log.warning("%s: exported with %s %s, loading with %s", root, dist, saved[dist], here)


def _load(root: Path, manifest: dict[str, Any], native: bool) -> ServingModel:
    spec = read_json(root, manifest, SPEC, "the feature spec")
    try:
        features = config_from_dict({"features": spec.get("features", {})}, where=str(root / SPEC)).features
    except ConfigError as e:
        raise PackageError(f"{root / SPEC}: {e}") from e
    where = root / "manifest.json"
    dtype = manifest["dtype"]
    if dtype not in DTYPES:
        raise PackageError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if manifest["prep"].get("kind") not in PREP_KINDS:
        raise PackageError(f"{where}: prep {manifest['prep'].get('kind')!r} is not one of {list(PREP_KINDS)}")
    _check_model(root, manifest)
    tables = {name: _table_rows(root, manifest, name, t) for name, t in manifest["tables"].items()}
    _check_tables_against_spec(root, manifest, features)
    ebc = _quant_module(root, manifest, "ebc", dtype)
    ec = _quant_module(root, manifest, "ec", dtype) if "ec" in manifest["lookups"] else None
    inputs = _dense_inputs(root, manifest)
    dense, fmt = _dense(root, manifest, native)
    if fmt == "exported":
        _check_program_inputs(root, manifest, dense, inputs)
    model = ServingModel(root, manifest, features, tables, ebc, ec, dense, fmt)
    model.data_id_maps, model.trained_on = _data_id_maps(root, spec)
    return model


def _data_id_maps(root: Path, spec: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """spec.json's ``data_id_maps``: the training import's dense-id mapping per column
    (:mod:`cdp_rec.data.id_maps`); ({}, None) when the package has none."""
    rec = spec.get("data_id_maps")
    if rec is None:
        return {}, None
    cols = rec.get("columns") if isinstance(rec, dict) else None
    if not isinstance(cols, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cols.items()):
        raise PackageError(f"{root / SPEC}: data_id_maps must be {{'data_root': ..., 'columns': {{column: sha256}}}}")
    return dict(cols), str(rec.get("data_root"))


# ----------------------------------------------------------------------------- cross-checks
# The runtime acts on the manifest's model, prep, tables and lookups; each is checked against
# what export writes for that model, against spec.json (the feature spec the inputs are
# validated by) and against the dense program's own input signature, so an edited field is a
# PackageError naming both sides instead of a KeyError later or scores of another model.


def _check_model(root: Path, manifest: dict[str, Any]) -> None:
    """model, family, prep and the lookups' history features agree with each other and with config.json."""
    where = root / "manifest.json"
    model, family, prep = manifest["model"], manifest["family"], manifest["prep"]
    kind = prep.get("kind")
    want = served_prep(model)
    if want is None:
        raise PackageError(f"{where}: model {model!r} has no serving export (served: base, cdp, cdp_no_*, sim)")
    if kind != want:
        raise PackageError(f"{where}: prep.kind {kind!r} does not fit model {model!r}, whose export writes "
                           f"{want!r}")
    want_family, ebc_hist, ec_hist = _PREP_SHAPES[kind]
    if family != want_family:
        raise PackageError(f"{where}: family {family!r} does not fit model {model!r} (prep.kind {kind!r}), "
                           f"which is {want_family!r}")
    lookups = manifest["lookups"]
    if not isinstance(lookups.get("ebc"), dict) or ("ec" in lookups) != (family == "sequence") \
            or ("ec" in lookups and not isinstance(lookups["ec"], dict)):
        raise PackageError(f"{where}: lookups {sorted(lookups)} do not fit family {family!r} "
                           f"({'ebc and ec' if family == 'sequence' else 'ebc only'})")
    history = {HIST_ITEMS, HIST_MATCH, SEQ_ITEMS, SEQ_CATEGORIES}
    for which, need in (("ebc", ebc_hist), ("ec", ec_hist)):
        feats = lookups.get(which, {}).get("features", [])
        got = set(feats) & history if isinstance(feats, list) else None
        if which in lookups and got != need:
            raise PackageError(f"{where}: lookups.{which}.features hold the history features {sorted(got or [])}; "
                               f"prep.kind {kind!r} (model {model!r}) makes {sorted(need)}")
    if family == "sequence":
        ec = lookups["ec"]
        if not {"item_id", "category_id"} <= set(ec.get("features", [])):
            raise PackageError(f"{where}: lookups.ec.features {ec.get('features')} lack the target's "
                               "item_id / category_id")
        top_k, seq_len = prep.get("top_k"), ec.get("seq_len")
        if not (type(top_k) is int and top_k >= 1 and top_k == seq_len):
            raise PackageError(f"{where}: prep.top_k {top_k!r} and lookups.ec.seq_len {seq_len!r} must be the same "
                               "integer >= 1 (the behaviours the search keeps)")
    if CONFIG in manifest["files"]:  # export always writes it (digested like every file)
        cfg = read_json(root, manifest, CONFIG, "the training config")
        name = cfg.get("model", {}).get("name") if isinstance(cfg.get("model"), dict) else None
        if name != model:
            raise PackageError(f"{where}: model {model!r}, but {root / CONFIG} has model.name {name!r} "
                               "(the manifest and the training config disagree)")


def _check_tables_against_spec(root: Path, manifest: dict[str, Any], features: FeatureConfig) -> None:
    """Each table's mapping, rows and features are those of spec.json's feature spec."""
    where, spec = root / "manifest.json", root / SPEC
    sizes = {table: n for table, (_, n) in table_size_fields(features).items()}
    columns = column_tables(features)
    for name, t in manifest["tables"].items():
        if name not in sizes:
            raise PackageError(f"{where}: table {name!r} is not a table of the feature spec in {spec} "
                               f"(its tables: {sorted(sizes)})")
        mapping = features.id_mapping.get(name, "dense")
        if t["mapping"] != mapping:
            raise PackageError(f"{where}: table {name!r} has mapping {t['mapping']!r}, but {spec} "
                               f"features.id_mapping makes it {mapping!r} (the manifest and the feature spec "
                               "disagree)")
        if t["rows"] != sizes[name]:
            raise PackageError(f"{where}: table {name!r} has {t['rows']} rows, but {spec}'s features give it "
                               f"{sizes[name]} (the manifest and the feature spec disagree)")
        feats = t.get("features")
        if not isinstance(feats, list) or not feats:
            raise PackageError(f"{where}: table {name!r} needs a list of features")
        for f in feats:
            column = _DERIVED_COLUMNS.get(f, f)
            if columns.get(column) != name:
                raise PackageError(f"{where}: table {name!r} lists feature {f!r}, whose ids {spec}'s features "
                                   f"look up in table {columns.get(column)!r}")


def _dense_inputs(root: Path, manifest: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    """The dense graph's inputs as the lookups feed them ``(name, dtype, shape)``, checked against
    ``dense.inputs`` of the manifest."""
    where = root / "manifest.json"
    tables, lookups = manifest["tables"], manifest["lookups"]
    dim = {f: tables[t]["dim"] for t, spec in tables.items() for f in spec["features"]}
    pooled = ("pooled", "float32", ["batch", sum(dim[f] for f in lookups["ebc"]["features"])])
    counts = ("counts", "int64", ["batch"])
    if manifest["family"] == "sequence":
        k = lookups["ec"]["seq_len"]
        want = [pooled, ("target_item", "float32", ["batch", dim["item_id"]]),
                ("target_category", "float32", ["batch", dim["category_id"]]),
                ("seq_items", "float32", ["batch", k, dim[SEQ_ITEMS]]),
                ("seq_categories", "float32", ["batch", k, dim[SEQ_CATEGORIES]]), counts]
    else:
        want = [pooled, counts]
    got = manifest["dense"].get("inputs")
    got_list = [(i.get("name"), i.get("dtype"), i.get("shape")) if isinstance(i, dict) else i
                for i in got] if isinstance(got, list) else got
    if got_list != [tuple(w) for w in want]:
        bad = next((i for i, (g, w) in enumerate(zip(got_list, want)) if g != w), None) \
            if isinstance(got_list, list) else None
        detail = (f"input {bad} is {_fmt_input(got_list[bad])}, the lookups feed {_fmt_input(want[bad])}"
                  if bad is not None else f"{_plain(got)}, the lookups feed {[_fmt_input(w) for w in want]}")
        raise PackageError(f"{where}: dense.inputs: {detail} (tables / lookups and dense.inputs disagree)")
    return want


def _fmt_input(item: Any) -> str:
    if isinstance(item, tuple) and len(item) == 3:
        return f"{item[0]} {item[1]} {_plain(item[2])}"
    return _plain(item)


def _plain(obj: Any) -> str:
    return json.dumps(obj)[:200]


def _check_program_inputs(root: Path, manifest: dict[str, Any], module: Any,
                          want: list[tuple[str, str, list[Any]]]) -> None:
    """The exported program's own input signature (its placeholders' shapes) is ``dense.inputs``."""
    program = root / manifest["dense"]["program"]["program"]
    got = []
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is None:
            got.append((node.name, None, None))
            continue
        dims = ["batch" if i == 0 and not isinstance(d, int) else d if isinstance(d, int) else str(d)
                for i, d in enumerate(shape)]
        got.append((node.name, str(val.dtype).replace("torch.", ""), dims))
    if got != [tuple(w) for w in want]:
        bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        have = _fmt_input(got[bad]) if bad < len(got) else "absent"
        told = _fmt_input(want[bad]) if bad < len(want) else "absent"
        raise PackageError(f"{program}: input {bad} of the program is {have}; {root / 'manifest.json'} dense.inputs "
                           f"says {told} (the program and the manifest disagree)")


def _table_rows(root: Path, manifest: dict[str, Any], name: str, t: Any) -> TableRows:
    where = root / "manifest.json"
    if not isinstance(t, dict) or t.get("mapping") not in ("dense", "hash", "managed") \
            or not isinstance(t.get("rows"), int) or t["rows"] < 1:
        raise PackageError(f"{where}: table {name!r} needs a mapping (dense|hash|managed) and rows >= 1")
    if t["mapping"] != "managed":
        return TableRows(name, t["mapping"], t["rows"])
    path = listed(root, manifest, t.get("ids"), f"table {name!r}'s ids")
    pairs = load_npy(path, np.int64, 2, mmap=False)
    if pairs.shape[1] != 2 or (len(pairs) > 1 and not bool(np.all(pairs[1:, 0] > pairs[:-1, 0]))) \
            or (len(pairs) and (pairs[:, 1].min() < 0 or pairs[:, 1].max() >= t["rows"])):
        raise PackageError(f"{path}: not (raw id, row) pairs ascending by raw id with rows in [0, {t['rows']})")
    ids = torch.from_numpy(pairs)
    return TableRows(name, "managed", t["rows"], ids[:, 0].contiguous(), ids[:, 1].contiguous())


def _quant_module(root: Path, manifest: dict[str, Any], which: str, dtype: str) -> Any:
    """The quantized EBC (``which="ebc"``) or EC from the package's table bytes."""
    where = root / "manifest.json"
    lookup = manifest["lookups"][which]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    configs: list[Any] = []
    for name in lookup["tables"]:
        t = manifest["tables"].get(name)
        if not isinstance(t, dict):
            raise PackageError(f"{where}: lookup {which!r} names table {name!r}, which 'tables' lacks")
        rows, dim, feats = t.get("rows"), t.get("dim"), t.get("features")
        if not (isinstance(rows, int) and isinstance(dim, int) and rows > 0 and dim > 0 and isinstance(feats, list)):
            raise PackageError(f"{where}: table {name!r} needs rows, dim and features")
        weight = load_npy(listed(root, manifest, t.get("weight"), f"table {name!r}'s weight"), np.uint8, 2)
        if weight.shape != (rows, dim * DTYPE_BYTES[dtype]):
            want = (rows, dim * DTYPE_BYTES[dtype])
            raise PackageError(f"{root / t['weight']}: shape {weight.shape}, expected {want} "
                               f"for a {rows} x {dim} {dtype} table")
        scale_shift = None
        if dtype == "int8":
            scale_shift = load_npy(listed(root, manifest, t.get("scale_shift"), f"table {name!r}'s scale/shift"),
                                   np.uint8, 2)
            if scale_shift.shape != (rows, 4):
                raise PackageError(f"{root / t['scale_shift']}: shape {scale_shift.shape}, expected {(rows, 4)}")
            _check_finite(root / t["scale_shift"], scale_shift, np.float16, "scale / bias")
        else:
            _check_finite(root / t["weight"], weight, np.float16 if dtype == "fp16" else np.float32, "weight")
        with warnings.catch_warnings():  # read-only memory maps: fbgemm copies them into its own buffer
            warnings.simplefilter("ignore", UserWarning)
            weights[name] = (torch.from_numpy(weight), None if scale_shift is None else torch.from_numpy(scale_shift))
        cls = EmbeddingBagConfig if which == "ebc" else EmbeddingConfig
        kwargs = {"pooling": PoolingType.SUM} if which == "ebc" else {}  # the dense program divides (bag_mean)
        configs.append(cls(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=list(feats),
                           data_type=DTYPES[dtype], **kwargs))
    cpu = torch.device("cpu")
    if which == "ebc":
        module = QuantEmbeddingBagCollection(configs, is_weighted=False, device=cpu, output_dtype=torch.float32,
                                             table_name_to_quantized_weights=weights)
        names = list(module._embedding_names)  # the KeyedTensor's key order
        if names != list(lookup["features"]):
            raise PackageError(f"{where}: lookup 'ebc' lists features {lookup['features']}, the tables give {names}")
    else:
        module = QuantEmbeddingCollection(configs, device=cpu, output_dtype=torch.float32,
                                          table_name_to_quantized_weights=weights)
    return module


def _check_finite(path: Path, raw: np.ndarray, dtype: type, what: str) -> None:
    """PackageError naming ``path`` if the float values in the uint8 rows ``raw`` hold a NaN / inf
    (int8 codes are always finite; their fp16 scale / bias are checked). Row chunks: bounded scratch."""
    for start in range(0, raw.shape[0], FINITE_CHECK_ROWS):
        values = np.ascontiguousarray(raw[start:start + FINITE_CHECK_ROWS]).view(dtype)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad) + start
            more = sum(int((~np.isfinite(np.ascontiguousarray(raw[s:s + FINITE_CHECK_ROWS]).view(dtype)))
                           .any(axis=1).sum()) for s in range(start + FINITE_CHECK_ROWS, raw.shape[0],
                                                              FINITE_CHECK_ROWS))
            raise PackageError(f"{path}: the table's {what} holds NaN / inf in {len(rows) + more} row(s), first "
                               f"row {int(rows[0])}; a package never does (damaged or tampered: re-export it)")


def _check_finite_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PackageError(f"{path}: {name!r} holds NaN / inf; a package never does (damaged or tampered: "
                               "re-export it)")


def _dense(root: Path, manifest: dict[str, Any], native: bool) -> tuple[Callable[..., Any], str]:
    dense = manifest["dense"]
    files = dense.get("program")
    if not isinstance(files, dict):
        raise PackageError(f"{root / 'manifest.json'}: 'dense' has no program")
    if native:
        if not dense.get("aoti"):
            raise PackageError(f"{root}: has no AOTInductor build of the dense graph"
                               + (f" (export failed to compile it: {dense['aoti_error']})" if dense.get("aoti_error")
                                  else " (export it with --compile aoti)"))
        return load_aoti(listed(root, manifest, dense["aoti"], "the AOTInductor build")), "aoti"
    paths = {k: listed(root, manifest, files.get(k), f"the dense program's {k}").relative_to(root).as_posix()
             for k in ("program", "weights", "constants")}
    module = load_program(root, paths)
    _check_finite_tensors(root / paths["weights"], dict(module.state_dict()))
    return module, "exported"
