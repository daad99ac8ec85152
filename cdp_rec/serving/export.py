"""``cdp-rec export --serving``: a checkpoint -> a self-contained serving package.

The package (layout in :mod:`cdp_rec.serving.package`) splits the model where TorchRec's
inference modules take over:

* the embedding tables, quantized by TorchRec's own quantizer
  (:func:`torchrec.quant.embedding_modules.quantize_state_dict`, what
  ``torchrec.inference.modules.quantize_embeddings`` / ``QuantEmbeddingBagCollection.from_float``
  run), row chunk by row chunk so no second copy of a table is ever held: ``fp32``,
  ``fp16`` or row-wise ``int8`` (fp16 scale and bias per row); the runtime rebuilds
  ``QuantEmbeddingBagCollection`` / ``QuantEmbeddingCollection`` from these bytes;
* everything after the lookups - the model's own ``forward`` with its lookup modules
  replaced by the looked-up tensors - captured by ``torch.export`` with a dynamic batch
  dimension, and with ``compile="aoti"`` also built by AOTInductor;
* the id mappings (managed tables' (raw id, row) pairs), the feature spec and the
  data-side step the model's ``prepare_batch`` does on ids (named, and re-done by the
  runtime: CDP's category filter, SIM's category search).

Models: ``base``, ``cdp`` and its ablations (``cdp_no_*``), ``sim``. The others do data-
or id-dependent work inside ``forward`` (TWIN/QIN score the whole history, DIN/HSTU cut
the last N on ids in ``forward`` paths of their own) and are refused with a message.

Capture, as measured on the 2-core dev box (torch 2.13.0+cpu): ``torch.export``
(non-strict, dynamic batch) captures the three models' dense graphs (CDP's unrolled
20-step reverse process included, ~600 nodes) in 0.3-3.5 s; AOTInductor compiles them
with the system g++ in 14-30 s per model (46 s with a cold inductor cache); both agree
with the eager model to ~1e-8 on the logits. An AOTInductor failure is recorded in the
manifest (``dense.aoti_error``) and the package keeps the exported program. Were
``torch.export`` to fail for a future model, the export fails naming the cause: there is
no state-dict + model-class fallback, because it would need the model code at serving time.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import Batch, id_ranges, table_schema
from cdp_rec.checksums import digest_files
from cdp_rec.serving.package import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPEC,
    PackageError,
    package_sha256,
)
from cdp_rec.serving.program import AOTI, CONSTANTS, PROGRAM, WEIGHTS, save_program
from cdp_rec.serving.runtime import DTYPE_BYTES, DTYPES, HIST_MATCH, SEQ_CATEGORIES, SEQ_ITEMS, served_prep

log = logging.getLogger(__name__)

QUANT_CHUNK_ROWS = 1 << 16  # rows quantized per call: bounded scratch whatever the table size
SAMPLE_BATCH = 8  # export traces at this batch size (>= 2: torch.export specializes sizes 0 and 1)
COMPILE_CHOICES = ("none", "aoti")


# ----------------------------------------------------------------------------- entry points


def export_serving(checkpoint: Path, out: Path, dtype: str = "fp32", compile: str = "none",
                   force: bool = False) -> tuple[dict[str, Any], str]:
    """Load ``checkpoint`` (safe loader: digests, allow-listed metadata, weights-only reads) and
    write its package to ``out``; returns ``(manifest, package sha256)``.

    ``out`` follows :func:`cdp_rec.training.checkpoint.export`'s rules: absent or empty, or
    a previous export replaced only with ``force``; built in ``<out>.tmp-<pid>`` and renamed.
    """
    from cdp_rec.training.checkpoint import check_export_target, load_unsharded, read_meta

    out = Path(out)
    _check_choices(dtype, compile)
    ck, dst = Path(checkpoint).resolve(), out.resolve()
    if dst.is_relative_to(ck) or ck.is_relative_to(dst):
        # Checkpoint pruning (checkpoint.keep_last) would delete a package inside it, and
        # --force would replace a checkpoint inside the package.
        raise PackageError(f"{out}: the package and the checkpoint {checkpoint} must not lie inside one another; "
                           "export to a directory outside the checkpoint")
    check_export_target(out, force)  # before the work, which can take long
    model, cfg = load_unsharded(Path(checkpoint))
    meta = read_meta(Path(checkpoint))
    source = {"checkpoint": str(checkpoint), "global_step": meta["global_step"], "samples": meta["samples"]}
    return write_package(model, cfg, out, dtype, compile, force=force, source=source)


def write_package(model: nn.Module, cfg: JobConfig, out: Path, dtype: str = "fp32", compile: str = "none",
                  force: bool = False, source: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Write the package of an in-memory (unsharded) model; returns ``(manifest, package sha256)``."""
    from cdp_rec.training.checkpoint import check_export_target, write_staged

    out = Path(out)
    _check_choices(dtype, compile)
    check_export_target(out, force)
    model = model.eval()
    manifest = write_staged(
        out, force, lambda staging: _write(model, cfg, staging, dtype, compile, source or {}), PackageError
    )
    return manifest, package_sha256(out)


def _check_choices(dtype: str, compile: str) -> None:
    if dtype not in DTYPES:
        raise PackageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if compile not in COMPILE_CHOICES:
        raise PackageError(f"--compile must be one of {list(COMPILE_CHOICES)}, got {compile!r}")


# ----------------------------------------------------------------------------- what a model is


def model_family(model: nn.Module, cfg: JobConfig) -> tuple[str, dict[str, Any]]:
    """``(family, prep)`` of a model this export supports; PackageError naming the model otherwise.

    ``pooled``: one EBC, pooled features only (``base``; ``cdp*`` with its filtered bag).
    ``sequence``: an EBC plus the unpooled behaviour EC (``sim``).
    """
    from cdp_rec.models.base import BaseModel
    from cdp_rec.models.cdp import CDPModel
    from cdp_rec.models.sim import SIMModel

    if isinstance(model, CDPModel):
        return "pooled", {"kind": "category_filter"}
    if isinstance(model, BaseModel):
        return "pooled", {"kind": "none"}
    if isinstance(model, SIMModel):
        return "sequence", {"kind": "category_search", "top_k": int(model.seq_len)}
    raise PackageError(f"model.name={cfg.model.name}: no serving export for this model yet "
                       "(supported: base, cdp, cdp_no_*, sim)")


# ----------------------------------------------------------------------------- dense graph


class _Returns(nn.Module):
    """Stands in for a lookup module while the dense graph is captured: returns ``self.out``."""

    def __init__(self) -> None:
        super().__init__()
        self.out: Any = None

    def forward(self, *_: Any) -> Any:
        return self.out


class _Jagged:
    """What the models read of a looked-up JaggedTensor: values, lengths, the padded form."""

    def __init__(self, values: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                 padded: torch.Tensor | None = None) -> None:
        self._values, self._lengths, self._padded = values, lengths, padded

    def values(self) -> torch.Tensor:
        assert self._values is not None
        return self._values

    def lengths(self) -> torch.Tensor:
        assert self._lengths is not None
        return self._lengths

    def to_padded_dense(self, desired_length: int | None = None, padding_value: float = 0.0) -> torch.Tensor:
        assert self._padded is not None and desired_length == self._padded.shape[1] and padding_value == 0.0
        return self._padded


class _Sparse:
    """The batch's KJT as the models' ``forward`` reads it after the lookups: ``kjt[key].lengths()``."""

    def __init__(self, features: dict[str, _Jagged]) -> None:
        self._features = features

    def __getitem__(self, key: str) -> _Jagged:
        return self._features[key]


def _without_lookups(model: nn.Module, **stubs: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` whose lookup modules are ``stubs`` and without the id mapper:
    the dense layers are shared (not copied); the tables are not part of the copy's state."""
    clone = copy.copy(model)
    clone._modules = {k: m for k, m in model._modules.items() if k != "id_mapper"}
    clone._modules.update(stubs)
    return clone


class PooledDense(nn.Module):
    """``(pooled [B, sum(dims)], counts [B] int64) -> logits [B]``: the model after its EBC lookup.

    ``pooled`` is the EBC's KeyedTensor values (features ``keys``, widths ``dims``; SUM-pooled bags);
    ``counts`` the lengths of the bag ``count_key`` (CDP: matches per sample).
    """

    def __init__(self, model: nn.Module, keys: list[str], dims: list[int], count_key: str) -> None:
        super().__init__()
        self.model = _without_lookups(model, ebc=_Returns())
        self.keys, self.dims, self.count_key = keys, dims, count_key

    def forward(self, pooled: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.model.ebc.out = KeyedTensor(keys=self.keys, length_per_key=self.dims, values=pooled)
        n = pooled.shape[0]
        batch = Batch(_Sparse({self.count_key: _Jagged(lengths=counts)}), torch.zeros(n), counts, counts)
        return self.model(batch)[1]["logits"]


class SequenceDense(nn.Module):
    """``(pooled, target_item [B, D], target_category [B, D], seq_items [B, K, D],
    seq_categories [B, K, D], counts [B]) -> logits [B]``: a sequence model after its EBC and
    (unpooled, padded to K) EC lookups."""

    def __init__(self, model: nn.Module, keys: list[str], dims: list[int]) -> None:
        super().__init__()
        self.model = _without_lookups(model, ebc=_Returns(), ec=_Returns())
        self.keys, self.dims = keys, dims

    def forward(self, pooled: torch.Tensor, target_item: torch.Tensor, target_category: torch.Tensor,
                seq_items: torch.Tensor, seq_categories: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.model.ebc.out = KeyedTensor(keys=self.keys, length_per_key=self.dims, values=pooled)
        self.model.ec.out = {
            "item_id": _Jagged(values=target_item), "category_id": _Jagged(values=target_category),
            SEQ_ITEMS: _Jagged(lengths=counts, padded=seq_items),
            SEQ_CATEGORIES: _Jagged(lengths=counts, padded=seq_categories),
        }
        n = pooled.shape[0]
        return self.model(Batch(_Sparse({}), torch.zeros(n), counts, counts))[1]["logits"]


def dense_module(model: nn.Module, family: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    """The dense wrapper of ``model``, sample inputs (batch :data:`SAMPLE_BATCH`) and their names."""
    ebc = model.ebc
    keys = list(ebc._embedding_names)
    dims = list(ebc._lengths_per_embedding)
    g = torch.Generator().manual_seed(0)
    n = SAMPLE_BATCH
    pooled = torch.randn(n, sum(dims), generator=g)
    if family == "pooled":
        count_key = HIST_MATCH if HIST_MATCH in keys else "hist_item_ids"
        counts = torch.randint(0, 5, (n,), generator=g)
        return PooledDense(model, keys, dims, count_key), (pooled, counts), ["pooled", "counts"]
    k, d = int(model.seq_len), int(model.ec.embedding_dim())
    counts = torch.randint(0, k + 1, (n,), generator=g)
    mask = (torch.arange(k)[None, :] < counts[:, None]).unsqueeze(-1)
    inputs = (pooled, torch.randn(n, d, generator=g), torch.randn(n, d, generator=g),
              torch.randn(n, k, d, generator=g) * mask, torch.randn(n, k, d, generator=g) * mask, counts)
    names = ["pooled", "target_item", "target_category", "seq_items", "seq_categories", "counts"]
    return SequenceDense(model, keys, dims), inputs, names


def capture(module: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str]) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (every input's dim 0), unused ops removed."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in names}
    try:
        with torch.no_grad():
            ep = torch.export.export(module.eval(), inputs, dynamic_shapes=dynamic)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PackageError(f"torch.export could not capture the dense graph ({type(e).__name__}: {first})") from e
    ep.graph.eliminate_dead_code()  # e.g. the BCE against the dummy labels
    ep.graph_module.recompile()
    return ep


# ----------------------------------------------------------------------------- tables


class _OneTable:
    """What ``quantize_state_dict`` reads of a module: ``state_dict()`` with one table's weight."""

    def __init__(self, name: str, weight: torch.Tensor) -> None:
        self._state = {f"embedding_bags.{name}.weight": weight}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def quantize_table(name: str, weight: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``weight [rows, D]`` float -> (``uint8 [rows, D * bytes]``, ``uint8 [rows, 4]`` int8 scale/bias or None).

    TorchRec's quantizer on chunks of rows; row-wise, so chunking changes nothing.
    """
    from torchrec.quant.embedding_modules import quantize_state_dict

    rows, dim = weight.shape
    codes = np.empty((rows, dim * DTYPE_BYTES[dtype]), dtype=np.uint8)
    scale_shift = np.empty((rows, 4), dtype=np.uint8) if dtype == "int8" else None
    for start in range(0, rows, QUANT_CHUNK_ROWS):
        chunk = weight[start:start + QUANT_CHUNK_ROWS].detach().to(torch.float32).contiguous()
        out: dict[str, Any] = {}
        quantize_state_dict(_OneTable(name, chunk), out, {name: DTYPES[dtype]})
        q, ss = out[name]
        codes[start:start + len(chunk)] = q.numpy()
        if scale_shift is not None:
            scale_shift[start:start + len(chunk)] = ss.numpy()
    return codes, scale_shift


def _table_weights(model: nn.Module, family: str) -> dict[str, tuple[str, torch.Tensor, list[str]]]:
    """name -> (lookup "ebc" | "ec", float weight [rows, D], features) of every table."""
    out: dict[str, tuple[str, torch.Tensor, list[str]]] = {}
    for c in model.ebc.embedding_bag_configs():
        out[c.name] = ("ebc", model.ebc.embedding_bags[c.name].weight, list(c.feature_names))
    if family == "sequence":
        for c in model.ec.embedding_configs():
            out[c.name] = ("ec", model.ec.embeddings[c.name].weight, list(c.feature_names))
    return out


# ----------------------------------------------------------------------------- writing


def _training_id_maps(cfg: JobConfig) -> dict[str, Any] | None:
    """The training import's dense-id mapping fingerprints (``_dataset.json`` ``ids.mapping_sha256``,
    see :mod:`cdp_rec.data.id_maps`) for the package's dense-range columns, so ``predict``
    can refuse rows numbered by another import. None: the data set has none (synthetic data, raw
    ids, an import before the record) or is not on this machine (a warning)."""
    from cdp_rec.data.id_maps import dataset_id_maps
    from cdp_rec.data.spec import DATASET_SPEC_FILE

    path = Path(cfg.data.root) / DATASET_SPEC_FILE
    if not path.is_file():
        if Path(cfg.data.root).is_dir():
            return None
        log.warning("%s not found: the package records no id mapping of its training data, so predict cannot "
                    "refuse rows of another import's dense ids", path)
        return None
    try:
        maps = dataset_id_maps(json.loads(path.read_text()))
    except (OSError, ValueError, RecursionError) as e:
        log.warning("%s: unreadable (%s): the package records no id mapping of its training data", path, e)
        return None
    ranges = id_ranges(cfg.features)
    dense = {c: h for c, h in maps.items() if ranges.get(c) is not None}
    return {"data_root": str(cfg.data.root), "columns": dense} if dense else None


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "numpy", "pyarrow", "cdp-rec"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _write(model: nn.Module, cfg: JobConfig, staging: Path, dtype: str, compile: str,
           source: dict[str, Any]) -> dict[str, Any]:
    family, prep = model_family(model, cfg)
    if served_prep(cfg.model.name) != prep["kind"]:  # load_package cross-checks the model's name against its prep
        raise PackageError(f"model.name={cfg.model.name}: the serving runtime does not know this name for a "
                           f"{type(model).__name__} (prep {prep['kind']!r}); add it to runtime.served_prep")
    (staging / "tables").mkdir()
    mapping = cfg.features.id_mapping
    tables: dict[str, Any] = {}
    lookups: dict[str, Any] = {"ebc": {"tables": [], "features": list(model.ebc._embedding_names)}}
    if family == "sequence":
        lookups["ec"] = {"tables": [], "features": [], "seq_len": int(model.seq_len)}
    for name, (which, weight, feats) in _table_weights(model, family).items():
        codes, scale_shift = quantize_table(name, weight, dtype)
        entry: dict[str, Any] = {"rows": int(weight.shape[0]), "dim": int(weight.shape[1]), "features": feats,
                                 "lookup": which, "mapping": mapping.get(name, "dense"),
                                 "weight": f"tables/{name}.weight.npy"}
        np.save(staging / entry["weight"], codes)
        if scale_shift is not None:
            entry["scale_shift"] = f"tables/{name}.scale_shift.npy"
            np.save(staging / entry["scale_shift"], scale_shift)
        if entry["mapping"] == "managed":
            raw, rows = model.id_mapper.managed[name].id_rows()
            entry["ids"] = f"tables/{name}.ids.npy"
            entry["held_ids"] = int(raw.numel())
            np.save(staging / entry["ids"], torch.stack([raw, rows], dim=1).numpy().astype(np.int64))
        tables[name] = entry
        lookups[which]["tables"].append(name)
        if which == "ec":
            lookups["ec"]["features"] += feats

    module, inputs, names = dense_module(model, family)
    t0 = time.perf_counter()
    ep = capture(module, inputs, names)
    dense: dict[str, Any] = {
        "inputs": [{"name": n, "dtype": str(x.dtype).replace("torch.", ""), "shape": ["batch", *x.shape[1:]]}
                   for n, x in zip(names, inputs)],
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch"]},
        "program": {"program": PROGRAM, "weights": WEIGHTS, "constants": CONSTANTS},
        "export_s": round(time.perf_counter() - t0, 2),
    }
    save_program(ep, staging)
    if compile == "aoti":
        t0 = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(staging / AOTI))
            dense["aoti"] = AOTI
            dense["aoti_compile_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # no compiler, an unsupported op: the exported program still serves
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            dense["aoti_error"] = f"{type(e).__name__}: {first}"
            log.warning("AOTInductor could not compile the dense graph (%s); the package has the exported "
                        "program only", dense["aoti_error"])

    features = dataclasses.asdict(cfg.features)
    schema = table_schema(cfg.features)
    spec = {
        "features": features,
        "columns": {f.name: str(f.type) for f in schema},
        "optional_columns": ["label"],
        "id_ranges": {k: v for k, v in id_ranges(cfg.features).items()},  # None: raw ids (hash / managed)
    }
    data_maps = _training_id_maps(cfg)
    if data_maps:
        spec["data_id_maps"] = data_maps
    (staging / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    (staging / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.model.name,
        "family": family,
        "dtype": dtype,
        "prep": prep,
        "tables": tables,
        "lookups": lookups,
        "dense": dense,
        "source": source,
        "versions": _versions(),
    }
    names_on_disk = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    manifest["files"] = digest_files(staging, names_on_disk)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks a complete package
    return manifest
