"""Sharded, crash-safe checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<dir>/step-000001234/``::

    .metadata, __0_0.distcp, ...   DCP: model state (ShardedTensors of every table,
                                   dense weights) and optimizer state (fused sparse +
                                   dense Adam), each rank writing its own shards
    rng-rank<r>.pt                 each rank's torch RNG state (CDP's diffusion noise)
    states.pt                      state of run-side objects attached to the
                                   Checkpointer (the per-day id-mapping report), rank 0
    meta.json                      written last by rank 0: training position, world
                                   size, batch size, table shapes, the resolved config,
                                   and ``files``: size and SHA-256 of every other file

Crash safety: everything is written into ``.step-....tmp`` and renamed into place by
rank 0 after every rank has finished, so a checkpoint directory either is complete or
does not exist; a crash mid-save leaves the previous checkpoint the latest. Only the
newest ``keep_last`` checkpoints are kept.

Resharding: DCP stores global offsets, so a checkpoint written by N ranks loads into M
ranks, another sharding plan, or an unsharded model (``cdp-rec evaluate`` / ``export``).

Trust: a checkpoint directory is data, not code. Every load (resume, evaluate, export)
first checks ``meta.json`` (a JSON object with the keys the loaders use), then every
file's size and SHA-256 against it, then unpickles ``.metadata`` with an allow-list of
DCP's metadata classes and reads tensors and other entries with torch's weights-only
unpickler (:mod:`cdp_rec.training.safe_load`). A checkpoint saved before the digests
existed loads with a warning (the allow-list still applies). The digests catch damage,
not tampering: whoever can rewrite the files can rewrite ``meta.json``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from cdp_rec.config import JobConfig, config_from_dict
from cdp_rec import checksums
from cdp_rec.training.safe_load import (
    METADATA,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    check_storage_paths,
    load_metadata,
    storage_files,
)

log = logging.getLogger(__name__)

META = "meta.json"
STATES = "states.pt"
PREFIX = "step-"
MANIFEST = "manifest.json"
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match the model; says what differs."""


@dataclass
class Position:
    """Where training stands: ``global_step`` steps done, ``samples`` global samples seen."""

    global_step: int = 0
    samples: int = 0
    final: bool = False


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def table_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Embedding table name -> [rows, dim] of every EmbeddingBagCollection / EmbeddingCollection of the model."""
    from embeddings.sharding import model_tables

    return {name: [loc.config.num_embeddings, loc.config.embedding_dim] for name, loc in model_tables(model).items()}


def table_state_keys(model: nn.Module) -> dict[str, str]:
    """``state_dict`` key of every embedding table's weight -> table name (pooled EBC and unpooled EC alike)."""
    from embeddings.sharding import model_tables

    keys = {}
    for name, loc in model_tables(model).items():
        part = "embedding_bags" if loc.pooled else "embeddings"
        keys[f"{loc.path}.{part}.{name}.weight" if loc.path else f"{part}.{name}.weight"] = name
    return keys


def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under ``root``, oldest first (staging dirs are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file())


# Keys every meta.json has (Checkpointer.save writes them all) and their JSON types; the
# loaders index them directly, so a file without one is refused here, not with a KeyError.
_META_KEYS: dict[str, type] = {
    "global_step": int, "samples": int, "world_size": int, "model": str, "tables": dict, "config": dict,
}
_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", dict: "object", list: "array",
               type(None): "null"}


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, checked to be an object with the keys the loaders read.

    Trusted: nothing; every cause of refusal is a one-line :class:`CheckpointError`.
    """
    meta = path / META
    if not meta.is_file():
        raise CheckpointError(f"{path}: not a committed checkpoint (no {META}; an interrupted save leaves none)")
    try:
        data = json.loads(meta.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{meta}: unreadable ({e.strerror or e})") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting past the stack
        raise CheckpointError(f"{meta}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{meta}: holds a JSON {_JSON_TYPES.get(type(data), '?')}, not an object")
    for key, kind in _META_KEYS.items():
        if key not in data:
            raise CheckpointError(f"{meta}: no {key!r} (every save writes it; the file was edited or cut)")
        if type(data[key]) is not kind:  # type(): bool is an int, but not a step count
            raise CheckpointError(f"{meta}: {key!r} is a JSON {_JSON_TYPES.get(type(data[key]), '?')}, "
                                  f"not a JSON {_JSON_TYPES[kind]}")
    # Counts a save can write: a negative step would "resume" before the start, a string
    # "final" would be truthy and end the run without training.
    for key, least in (("global_step", 0), ("samples", 0), ("world_size", 1)):
        if data[key] < least:
            raise CheckpointError(f"{meta}: {key!r} is {data[key]}, a save writes a count >= {least}")
    if "final" in data and type(data["final"]) is not bool:
        raise CheckpointError(f"{meta}: 'final' is a JSON {_JSON_TYPES.get(type(data['final']), '?')}, "
                              "not a JSON boolean")
    return data


# ----------------------------------------------------------------------------- integrity


def _file_records(path: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """meta.json's ``files`` (name -> size, sha256), validated; None for a pre-digest checkpoint."""
    files = meta.get("files")
    if files is None:
        return None
    where = path / META
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: 'files' is a JSON {_JSON_TYPES.get(type(files), '?')}, not an object")
    for name, record in files.items():
        # Only bare names: a digest entry must not make us open a file outside the checkpoint.
        if Path(name).name != name or name in ("", ".", "..", META):
            raise CheckpointError(f"{where}: 'files' lists {name!r}, which is not a file of the checkpoint")
        bad = checksums.check_record(record)
        if bad:
            raise CheckpointError(f"{where}: 'files' entry {name!r} {bad}")
    return files


def _share(names: list[str], records: dict[str, dict[str, Any]], rank: int, world: int) -> list[str]:
    # Largest first, dealt round-robin: every rank hashes about the same number of bytes.
    order = sorted(names, key=lambda n: (-records[n]["size"], n))
    return order[rank::world]


def _check_regular(file: Path) -> None:
    """Refuse a checkpoint entry that exists but is not a regular file (after links).

    Hashing or unpickling a FIFO, ``/dev/zero`` or a directory would block forever or
    read without end; a missing file is left to the size check, which names it.
    """
    try:
        st = file.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read checkpoint: unreadable ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{file}: cannot read checkpoint: not a regular file "
                              f"({'a directory' if stat.S_ISDIR(st.st_mode) else 'a FIFO, device or socket'})")


def verify_files(path: Path, meta: dict[str, Any], rank: int = 0, world: int = 1) -> None:
    """Check this rank's share of the checkpoint's files against meta.json, before reading any.

    All sizes first (a stat each: a truncated file is found without hashing anything), then
    the digests of ``rank``'s share. A checkpoint without digests loads with a warning.
    """
    records = _file_records(path, meta)
    if records is None:
        if rank == 0:
            log.warning("%s: saved without file digests (older cdp-rec): loading it without an integrity check", path)
        return
    for name in sorted(records):
        _check_regular(path / name)
        bad = checksums.size_difference(path / name, records[name])
        if bad:
            raise CheckpointError(f"{path / name}: cannot read checkpoint: {bad}")
    for name in _share(list(records), records, rank, world):
        bad = checksums.digest_difference(path / name, records[name])
        if bad:
            raise CheckpointError(f"{path / name}: cannot read checkpoint: {bad}")


def read_dcp_metadata(path: Path, meta: dict[str, Any]) -> Any:
    """``.metadata`` through the allow-list unpickler; every data file it names must be digested.

    The second check keeps DCP from reading a file that :func:`verify_files` did not see.
    """
    file = path / METADATA
    try:
        md = load_metadata(file)  # refuses a FIFO / device / directory before opening it
        check_storage_paths(md)
    except UnsafeCheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from e
    records = _file_records(path, meta)
    unlisted = sorted({METADATA, *storage_files(md)} - set(records)) if records is not None else []
    if unlisted:
        raise CheckpointError(f"{path / unlisted[0]}: not among the files {META} lists; refusing to read it")
    return md


def _agreed(check: Callable[[], T]) -> T:
    """Run a check that can fail on some ranks only; then every rank raises the first failure.

    A rank that raised alone would leave the others waiting in DCP's next collective.
    """
    if not dist.is_initialized():
        return check()
    err: str | None = None
    result: Any = None
    try:
        result = check()
    except CheckpointError as e:
        err = str(e)
    errs: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    first = next((e for e in errs if e), None)
    if first:
        raise CheckpointError(first)
    return result


def check_compatible(path: Path, meta: dict[str, Any], cfg: JobConfig, tables: dict[str, list[int]]) -> None:
    """Refuse a checkpoint of another model, other table sizes or another id mapping, naming the difference."""
    if meta.get("model") != cfg.model.name:
        raise CheckpointError(f"{path}: checkpoint is of model {meta.get('model')!r}, the config asks for {cfg.model.name!r}")
    saved_cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    saved_map = (saved_cfg.get("features") or {}).get("id_mapping") or {}
    if isinstance(saved_map, dict):
        for table in sorted(set(saved_map) | set(cfg.features.id_mapping)):
            a, b = saved_map.get(table, "dense"), cfg.features.id_mapping.get(table, "dense")
            if a != b:
                raise CheckpointError(f"{path}: table {table!r} has id mapping {a!r} in the checkpoint but {b!r} "
                                      f"in the config (features.id_mapping.{table})")
    saved, want = meta.get("tables", {}), tables
    for name in sorted(set(saved) | set(want)):
        if saved.get(name) != want.get(name):
            raise CheckpointError(
                f"{path}: table {name!r} is {saved.get(name)} (rows, dim) in the checkpoint but "
                f"{want.get(name)} in the config"
            )


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """DCP load through the allow-list reader and the weights-only planner (never plain pickle)."""
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        cause = _first_failure(e)
        if isinstance(cause, KeyboardInterrupt):  # Ctrl-C inside DCP's worker, wrapped
            raise KeyboardInterrupt from e
        if isinstance(cause, UnsafeCheckpointError):
            raise CheckpointError(f"{path}: {cause}") from e
        refused = _WEIGHTS_ONLY_REFUSAL.search(str(cause))
        if refused:  # torch's own text would suggest weights_only=False: exactly what not to do
            why = refused.group(1).strip() or "it holds objects other than tensors and plain containers"
            raise CheckpointError(f"{path}: cannot read checkpoint (refused by the weights-only unpickler: "
                                  f"{why})") from e
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first[-1] if first else e})") from e


_WEIGHTS_ONLY_REFUSAL = re.compile(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)")


def _first_failure(e: BaseException) -> BaseException:
    """The first failed rank's exception inside DCP's CheckpointException (else ``e``)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def _os_cause(e: BaseException) -> str | None:
    """The OS's reason (``No space left on device``, ``File too large``, ...) behind a
    failed write, or None. torch's writers raise a RuntimeError about stream positions;
    the OSError is in the exception's context (DCP: its first failed rank's exception)."""
    todo, seen = [e, _first_failure(e)], set()
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno:
            return os.strerror(cur.errno)
        todo += [cur.__cause__, cur.__context__]
    return None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _load_listed(path: Path, meta: dict[str, Any], file: Path, unreadable: str) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file that ``meta.json`` must list.

    ``unreadable`` starts the error for a file that does not load (a cut zip, a refused
    global, an I/O error); a file the record does not list is never opened.
    """
    records = _file_records(path, meta)
    if records is not None and file.name not in records:
        raise CheckpointError(f"{file}: not among the files {META} lists; refusing to read it")
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: {unreadable} ({type(e).__name__}: {_first_line(e)})") from e


def _read_rng(path: Path, meta: dict[str, Any]) -> torch.Tensor | None:
    """This rank's saved torch RNG state (weights-only unpickler); None if none was saved."""
    file = path / f"rng-rank{_rank()}.pt"
    if not file.is_file():
        return None  # a listed file that is missing was already refused by verify_files
    saved = _load_listed(path, meta, file, "unreadable RNG state")
    state = saved.get("torch") if isinstance(saved, dict) else None
    current = torch.get_rng_state()
    if not isinstance(state, torch.Tensor) or state.dtype != current.dtype or state.shape != current.shape:
        raise CheckpointError(f"{file}: not a torch RNG state (expected {{'torch': {current.numel()} uint8}})")
    return state


def _read_states(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The attached objects' saved states (weights-only unpickler); {} if none were saved."""
    file = path / STATES
    if not file.is_file():
        return {}
    saved = _load_listed(path, meta, file, "unreadable")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: not a dict of states")
    return saved


def _digest_collectively(staging: Path) -> dict[str, dict[str, Any]]:
    """Collective, after every rank's files are in ``staging``: size and SHA-256 of each.

    Rank 0 lists the files (one listing, so every rank hashes from the same list), the
    ranks hash a share each, rank 0 gets them all (the others get ``{}``).
    """
    if not dist.is_initialized():
        return checksums.digest_files(staging, _listing(staging))
    listing: list[Any] = [None]
    if _rank() == 0:
        listing[0] = {name: {"size": (staging / name).stat().st_size} for name in _listing(staging)}
    dist.broadcast_object_list(listing, src=0)
    sizes: dict[str, dict[str, Any]] = listing[0]
    mine = checksums.digest_files(staging, _share(list(sizes), sizes, _rank(), dist.get_world_size()))
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return dict(sorted((name, d) for part in parts for name, d in part.items())) if _rank() == 0 else {}


def _listing(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.iterdir() if p.is_file() and p.name != META)


class Checkpointer:
    """Saves and restores a :class:`~cdp_rec.training.trainer.Trainer`'s state under ``root``."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self._attached: dict[str, Any] = {}

    def attach(self, name: str, obj: Any) -> None:
        """Checkpoint ``obj`` too: ``obj.checkpoint_state()`` (collective; the same on every
        rank, or None) is saved by rank 0 in ``states.pt`` (tensors and plain containers);
        :meth:`load` hands it back through ``obj.load_checkpoint_state(state, global_step)``
        (None when the checkpoint has none)."""
        self._attached[name] = obj

    def latest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def save(self, trainer: Any, position: Position, extra: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step."""
        name = f"{PREFIX}{position.global_step:09d}"
        final, staging = self.root / name, self.root / f".{name}.tmp"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # debris of a crashed save
            shutil.rmtree(final, ignore_errors=True)
        _barrier()
        try:
            dcp.save({"model": trainer.module.state_dict(), "optim": trainer.optimizer.state_dict()},
                     checkpoint_id=str(staging))
            torch.save({"torch": torch.get_rng_state()}, staging / f"rng-rank{_rank()}.pt")
            attached = {k: obj.checkpoint_state() for k, obj in self._attached.items()}
            attached = {k: v for k, v in attached.items() if v is not None}
            if attached and _rank() == 0:
                torch.save(attached, staging / STATES)
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if isinstance(_first_failure(e), KeyboardInterrupt):  # Ctrl-C inside DCP's worker, wrapped
                raise KeyboardInterrupt from e
            # A full or read-only disk surfaces as DCP's CheckpointException or torch.save's
            # RuntimeError, not as an OSError: say which directory and why, in one line.
            cause = _os_cause(e)
            if cause is not None:  # e.g. DCP's "unexpected pos 704 vs 598" over a hidden ENOSPC
                raise CheckpointError(f"{staging}: cannot write checkpoint: {cause}") from e
            lines = str(e).strip().splitlines()
            raise CheckpointError(f"{staging}: cannot write checkpoint ({type(e).__name__}: "
                                  f"{lines[-1] if lines else e})") from e
        _barrier()
        files = _digest_collectively(staging)
        if _rank() == 0:
            meta = {
                "global_step": position.global_step,
                "samples": position.samples,
                "final": position.final,
                "model": trainer.cfg.model.name,
                "tables": trainer.table_shapes,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "config": trainer.cfg.to_dict(),
                "config_hash": trainer.cfg.hash(),
                **extra,
                "files": files,
            }
            (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(staging, final)  # atomic: the checkpoint appears complete or not at all
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, trainer: Any, path: Path) -> tuple[Position, dict[str, Any]]:
        """Restore model, optimizer and this rank's RNG from ``path`` (any world size).

        Collective. Before DCP reads any tensor: meta.json, every file's size and digest (the
        hashing split across ranks), ``.metadata`` through the allow-list and this rank's
        RNG file; a failure anywhere is the same :class:`CheckpointError` on every rank.
        """
        world = dist.get_world_size() if dist.is_initialized() else 1

        def check() -> tuple[dict[str, Any], torch.Tensor | None, dict[str, Any]]:
            meta = read_meta(path)
            check_compatible(path, meta, trainer.cfg, trainer.table_shapes)
            verify_files(path, meta, _rank(), world)
            read_dcp_metadata(path, meta)
            # Another world size deals the batches differently: the saved streams do not apply.
            return (meta, (_read_rng(path, meta) if meta["world_size"] == world else None),
                    _read_states(path, meta) if self._attached else {})

        meta, rng, attached = _agreed(check)
        # Optimizer state is lazy: one zero-gradient step creates the tensors DCP loads into
        # (Adam's update is exactly 0 there, so the weights do not move).
        trainer.optimizer.init_state()
        trainer.optimizer.zero_grad(set_to_none=True)
        state = {"model": trainer.module.state_dict(), "optim": trainer.optimizer.state_dict()}
        _dcp_load(state, path)
        trainer.module.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optim"])
        if rng is not None:
            torch.set_rng_state(rng)
        pos = Position(meta["global_step"], meta["samples"], meta.get("final", False))
        for name, obj in self._attached.items():
            try:
                obj.load_checkpoint_state(attached.get(name), pos.global_step)
            except ValueError as e:
                raise CheckpointError(f"{path / STATES}: the saved {name} state {e}") from e
        return pos, meta


# ----------------------------------------------------------------------------- offline use


def config_of(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """The resolved config a checkpoint was trained with, plus ``--set`` overrides."""
    from cdp_rec.config import _apply_override  # the same parser as the CLI's --set

    data = read_meta(path)["config"]
    for ov in overrides:
        data = _apply_override(data, ov)
    return config_from_dict(data, where=str(path / META))


def _verified(path: Path) -> dict[str, Any]:
    """meta.json, after every file's digest and ``.metadata``'s allow-list check (one process)."""
    meta = read_meta(path)
    verify_files(path, meta)
    read_dcp_metadata(path, meta)
    return meta


def load_unsharded(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[nn.Module, JobConfig]:
    """An unsharded model with the checkpoint's weights, whatever world size wrote it."""
    from cdp_rec.models import build_model

    cfg = config_of(path, overrides)
    model = build_model(cfg)
    check_compatible(path, read_meta(path), cfg, table_shapes(model))
    _verified(path)
    state = {"model": model.state_dict()}
    _dcp_load(state, path)
    model.load_state_dict(state["model"])
    return model, cfg


def check_export_target(out: Path, force: bool = False) -> None:
    """Refuse to export over anything but nothing, an empty directory or (``force``) a previous export.

    A previous export is recognised by its ``manifest.json``, which :func:`export` writes
    last; any other non-empty directory may be someone's data and is never replaced.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CheckpointError(f"{out}: exists and is not a plain directory (a file or a link); "
                              "refusing to export over it")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise CheckpointError(f"{out}: exists, is not empty and holds no previous export ({MANIFEST}); "
                              "refusing to export into it")
    if not force:
        raise CheckpointError(f"{out}: holds a previous export; use --force to replace it")


def _commit_export(staging: Path, out: Path, force: bool) -> None:
    check_export_target(out, force)  # again: another export may have finished meanwhile
    if not out.exists() or not any(out.iterdir()):
        os.replace(staging, out)  # onto nothing or an empty directory: atomic
        return
    # A directory cannot atomically replace a non-empty one: move the old export aside first.
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(path: Path, out: Path, force: bool = False) -> dict[str, Any]:
    """Write an unsharded serving artifact: one ``.npy`` per table, ``dense.pt``, config, manifest.

    Tables are every EmbeddingBagCollection's and EmbeddingCollection's (the sequence
    models' unpooled item / category tables too): ``tables/<table>.npy``, whatever the
    sharding that wrote the checkpoint.

    Each table's ``.npy`` is created on disk first and memory-mapped; DCP then reads the
    table's saved shards one by one straight into that mapping (it loads only the
    requested key, one saved shard per read). The process therefore holds at most one
    saved shard in its own memory plus file-backed pages the OS can write back - never a
    whole table, and never the whole model - so a table larger than the export box's RAM
    still exports. Dense weights are small and go to ``dense.pt``.

    Everything is written into the sibling ``<out>.tmp-<pid>`` and renamed to ``out`` at
    the end, so ``out`` is a complete export or absent (a failed export removes its staging
    directory; a killed one leaves only that). ``out`` may be absent or empty; a previous
    export (it has ``manifest.json``) is replaced only with ``force``; anything else is
    refused. ``manifest.json`` lists the size and SHA-256 of every other file.
    """
    from cdp_rec.models import build_model

    out = Path(out)
    check_export_target(out, force)  # before the work, which can take long
    cfg = config_of(path)
    model = build_model(cfg, device="meta")
    check_compatible(path, read_meta(path), cfg, table_shapes(model))
    meta = _verified(path)
    return write_staged(out, force, lambda staging: _write_export(path, meta, model, staging), CheckpointError)


def write_staged(out: Path, force: bool, write: Callable[[Path], T], error: type[Exception]) -> T:
    """Run ``write(staging)`` into a fresh sibling directory of ``out``, then move it into place.

    The export rules shared by ``export`` and ``export --serving``: the caller has already
    checked the target (:func:`check_export_target`); a failed or interrupted write leaves
    ``out`` as it was and removes the staging directory; an OSError becomes one ``error``
    naming ``out``.
    """
    staging = out.parent / f"{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # debris of an earlier process with our pid
        staging.mkdir()
        result = write(staging)
        _commit_export(staging, out, force)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise error(f"{out}: export failed ({e.strerror or type(e).__name__}: {e.filename or e})") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _write_export(path: Path, meta: dict[str, Any], model: nn.Module, staging: Path) -> dict[str, Any]:
    (staging / "tables").mkdir(parents=True)
    manifest: dict[str, Any] = {"checkpoint": str(path), "global_step": meta["global_step"], "tables": {}}
    dense: dict[str, torch.Tensor] = {}
    tables = table_state_keys(model)
    for key, t in model.state_dict().items():
        table = tables.get(key)
        if table is not None:  # an EBC or EC table: streamed shard by shard into its .npy
            file = staging / "tables" / f"{table}.npy"
            target = np.lib.format.open_memmap(
                file, mode="w+", dtype=torch.empty((), dtype=t.dtype).numpy().dtype, shape=tuple(t.shape),
            )
            _reserve(file)
            _dcp_load({"model": {key: torch.from_numpy(target)}}, path)
            target.flush()
            del target
            manifest["tables"][table] = {"key": key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        else:
            dense[key] = torch.empty(t.shape, dtype=t.dtype) if t.is_meta else t.detach().clone()
    if dense:
        buf = {"model": dense}
        _dcp_load(buf, path)
        torch.save(buf["model"], staging / "dense.pt")
        mapping = _export_id_mapping(model, buf["model"], staging)
        if mapping:
            manifest["id_mapping"] = mapping
    (staging / "config.json").write_text(json.dumps(meta["config"], indent=2) + "\n")
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    manifest["files"] = checksums.digest_files(staging, names)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks a complete export
    return manifest


def _reserve(file: Path) -> None:
    """Allocate the blocks of a freshly created (sparse) memory-mapped file up front.

    A store into a mapped page the file system has no block for is a SIGBUS that kills
    the process with no message (a full disk, a quota); reserved first, a full disk is an
    OSError naming the file here instead.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # a file system that cannot reserve
            return
        raise OSError(e.errno, os.strerror(e.errno), str(file)) from e
    finally:
        os.close(fd)


def _export_id_mapping(model: nn.Module, state: dict[str, torch.Tensor], staging: Path) -> dict[str, Any]:
    """Raw id -> row of every hash / managed table (features.id_mapping), for serving.

    A managed table's held ids go to ``tables/<table>.ids.npy``: int64 ``[n, 2]`` rows of
    (raw id, row), ascending by raw id; an id not in it uses the table's shared last row.
    A hash table needs no file: its row is ``(splitmix64(id) >> 1) mod rows``
    (:func:`embeddings.id_mapping.hash_rows`). The mapping's raw buffers are in
    ``dense.pt`` too (keys ``...id_mapper...``), for reloading the model exactly.
    """
    mapper = getattr(model, "id_mapper", None)
    if mapper is None:
        return {}
    prefix = next(n for n, m in model.named_modules() if m is mapper)
    out: dict[str, Any] = {}
    for name, spec in mapper.specs.items():
        entry: dict[str, Any] = {"mapping": spec.kind, "rows": spec.num_rows, "features": list(spec.features)}
        if spec.kind == "managed":
            key = f"{prefix}.managed.{name}."
            raw, rows = state[key + "_mch_sorted_raw_ids"], state[key + "_mch_remapped_ids_mapping"]
            n = int(torch.searchsorted(raw, torch.tensor([2**63 - 1])))
            pairs = torch.stack([raw[:n], rows[:n]], dim=1).numpy()
            np.save(staging / "tables" / f"{name}.ids.npy", pairs)
            entry.update(ids_file=f"tables/{name}.ids.npy", held_ids=n, shared_row=spec.num_rows - 1)
        else:
            entry["function"] = "(splitmix64(id) >> 1) mod rows, int64 arithmetic modulo 2**64"
        out[name] = entry
    return out
