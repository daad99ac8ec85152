"""Read DCP checkpoints without running code from them.

``torch.distributed.checkpoint`` trusts its files: ``FileSystemReader.read_metadata``
unpickles ``.metadata`` with the plain :mod:`pickle` module, and
``DefaultLoadPlanner.load_bytes`` calls ``torch.load(weights_only=False)`` on every
non-tensor entry. Either one runs arbitrary code from a checkpoint directory someone else
handed over, before any check of ours. This module replaces both:

* :class:`SafeFileSystemReader` unpickles ``.metadata`` with :class:`MetadataUnpickler`,
  which builds only the classes in :data:`ALLOWED_GLOBALS` (plus ``torch`` dtypes) and
  refuses every other global, so a foreign pickle fails before any of its code runs;
* :class:`SafeLoadPlanner` loads non-tensor entries with ``torch.load(weights_only=True)``
  (tensor entries already are: ``FileSystemReader.read_data`` passes ``weights_only=True``).

What is trusted: the allow-listed classes (their constructors, ``__setstate__`` and enum
lookups only store values) and torch's weights-only unpickler. What is not: every byte of
the checkpoint, including the file names ``.metadata`` points DCP at (see
:func:`check_storage_paths`).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

METADATA = ".metadata"

# module -> names a DCP ``.metadata`` pickle may name. Found by recording every global a
# real save pickles (1 unsharded process; 2 gloo ranks row_wise and table_wise: the same set).
ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata",                 # the top-level object
        "StorageMeta",              # checkpoint_id / save_id of the save
        "MetadataIndex",            # keys of storage_data: (fqn, chunk offset, index)
        "TensorStorageMetadata",    # one per tensor entry: properties, global size, chunks
        "ChunkStorageMetadata",     # one per saved shard of a (Sharded)Tensor: offsets, sizes
        "TensorProperties",         # dtype, layout, requires_grad, pin_memory of an entry
        "_MEM_FORMAT_ENCODING",     # the enum TensorProperties pickles memory_format as
        "BytesStorageMetadata",     # non-tensor entries (none in our state today; harmless)
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({
        "_StorageInfo",             # storage_data values: file name, offset, length
    }),
    "torch": frozenset({"Size"}),   # global sizes and chunk sizes
    "torch.serialization": frozenset({"_get_layout"}),  # torch.layout's pickle: a name lookup
    # StorageMeta.checkpoint_id is the save's path object; Python 3.13 moved it to pathlib._local.
    "pathlib": frozenset({"PosixPath"}),
    "pathlib._local": frozenset({"PosixPath"}),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that is refused rather than read; the message names the cause."""


def _is_dtype(module: str, name: str) -> bool:
    # dtypes pickle as module-level globals (torch.float32, torch.bfloat16, ...): allow
    # exactly those names of torch whose object is a dtype, whatever dtype a table uses.
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def allowed_global(module: str, name: str) -> bool:
    return name in ALLOWED_GLOBALS.get(module, frozenset()) or _is_dtype(module, name)


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only the classes DCP metadata is made of.

    Every global a pickle names (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT opcodes) goes through
    :meth:`find_class`, so nothing outside the allow-list is imported, called or built.
    """

    def find_class(self, module: str, name: str) -> Any:
        if not allowed_global(module, name):
            raise UnsafeCheckpointError(f"refused to unpickle {module}.{name}: not a class DCP metadata uses")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refused to unpickle a persistent id: DCP metadata has none")


def load_metadata(file: Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file with :class:`MetadataUnpickler`.

    Raises :class:`UnsafeCheckpointError` (message without the file name) for a refused
    global and for anything that is not intact DCP metadata.
    """
    if file.exists() and not file.is_file():  # a FIFO or device would block or never end
        raise UnsafeCheckpointError("not a regular file")
    try:
        with open(file, "rb") as f:
            md = MetadataUnpickler(f).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a cut or garbled pickle raises nearly anything
        raise UnsafeCheckpointError(f"not readable DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"holds a {type(md).__name__}, not DCP Metadata")
    return md


def storage_files(md: Metadata) -> set[Any]:
    """The file names (relative to the checkpoint) DCP reads data from; unchecked values."""
    names: set[Any] = set()
    for info in (md.storage_data or {}).values():
        names.add(getattr(info, "relative_path", None))
    return names


def check_storage_paths(md: Metadata) -> None:
    """Refuse metadata that points DCP at a file outside the checkpoint directory.

    DCP opens ``<checkpoint>/<relative_path>`` for each entry; an absolute path or ``..``
    would make it read (and feed to the unpickler) any file on the machine.
    """
    if not isinstance(md.storage_data, dict):
        raise UnsafeCheckpointError("has no storage_data mapping")
    for name in storage_files(md):
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise UnsafeCheckpointError(f"refers to data file {name!r} outside the checkpoint directory")


class SafeFileSystemReader(FileSystemReader):
    """:class:`FileSystemReader` whose ``.metadata`` goes through :func:`load_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA if rank is None else f"__{rank}{METADATA}"
        md = load_metadata(Path(self.path) / name)
        check_storage_paths(md)
        # What FileSystemReader.read_metadata does after its pickle.load.
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """:class:`DefaultLoadPlanner` that loads non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        # The rest mirrors DefaultLoadPlanner.load_bytes.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
