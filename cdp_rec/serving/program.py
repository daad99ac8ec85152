"""The dense graph of a serving package: a ``torch.export`` program as JSON, read back without running code from it.

``torch.export.save`` / ``torch.export.load`` are not used: in torch 2.13 ``load``
unpickles weights and constants with ``weights_only=False`` (and falls back to it when the
weights-only read fails), ``exec`` s the program's ``guards_code`` (Python source stored in
the file) when the module is built, ``sympy.sympify`` s (``eval``) every symbolic-shape
string, and resolves every node target as any attribute path under ``torch`` /
``operator`` (``torch.os.system`` would do). Any of these runs code from the file.

So the package stores the three parts of torch's own serialization separately
(``torch._export.serde.serialize``: the program JSON, the state dict, the constants) and
:func:`load_program` reads them back through an allow-list, like the checkpoint loader's
(:mod:`cdp_rec.training.safe_load`):

* weights and constants: dicts of tensors read with ``torch.load(weights_only=True)``
  (handed to the deserializer as objects, so it never unpickles anything itself);
* the JSON: every node target must be an ATen operator overload
  (``torch.ops.aten.<op>.<overload>``, ``from_file`` excepted) or one of a few
  ``operator`` functions on integers (``getitem``, arithmetic, comparisons); graph-valued,
  custom-object and operator-valued arguments are refused; every symbolic expression must
  consist of sympy constructors of integer symbols (``Symbol('s0', ...)``, ``Integer``,
  ``Add``, ``Mul``, ``Max``, ``Min``, ``FloorDiv``, ``Mod``...) - no other name, no
  attribute access, no string but a symbol name; ``guards_code`` must be empty (export
  writes none; the runtime checks input shapes itself); node metadata (stack traces,
  module paths) is dropped before deserializing.

What is trusted: torch's JSON deserializer on input that passed these checks, and the ATen
operators the graph names. ``aoti.pt2`` is the other form of the same graph, compiled to a
shared library by AOTInductor: loading it runs native code from the package, so
:func:`load_aoti` is used only when the caller asks for it (``native=True``).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from cdp_rec.serving.package import PackageError

PROGRAM = "dense/program.json"
WEIGHTS = "dense/weights.pt"
CONSTANTS = "dense/constants.pt"
AOTI = "dense/aoti.pt2"

_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
_DENIED_ATEN = {"from_file"}  # reads a file named by its argument
_OPERATOR_TARGETS = {f"_operator.{n}" for n in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_",
)}
_REFUSED_ARGUMENTS = {"as_graph", "as_custom_obj", "as_operator", "as_optional_tensors_graph"}
# A symbolic expression: sympy constructors of integer symbols, integers and punctuation only.
_EXPR_TOKEN = re.compile(
    r"\s+|[(),=+\-*/]|\d+|'[su]\d+'|(?:Symbol|Integer|Add|Mul|Max|Min|FloorDiv|CeilDiv|Mod|PythonMod|Pow|"
    r"Rational|IntTrueDiv|CleanDiv|positive|integer|nonnegative|True|False)\b"
)


def save_program(ep: torch.export.ExportedProgram, staging: Path) -> list[str]:
    """Write ``ep`` as :data:`PROGRAM`, :data:`WEIGHTS`, :data:`CONSTANTS` under ``staging``; returns their names."""
    from torch._export.serde.serialize import serialize

    art = serialize(ep)
    program = json.loads(art.exported_program)
    program["guards_code"] = []  # Python source that ep.module() would exec; the runtime checks shapes itself
    _drop_metadata(program)
    check_program(program, staging / PROGRAM)  # what we write must pass what we read
    (staging / "dense").mkdir(parents=True, exist_ok=True)
    (staging / PROGRAM).write_text(json.dumps(program, separators=(",", ":")))
    # serialize() gives each part as torch.save bytes of a dict of tensors; re-save them as
    # such so that they load with weights_only=True (checked here, as the runtime will).
    for name, blob in ((WEIGHTS, art.state_dict), (CONSTANTS, art.constants)):
        obj = torch.load(io.BytesIO(blob), weights_only=True) if blob else {}
        torch.save(dict(obj), staging / name)
    return [PROGRAM, WEIGHTS, CONSTANTS]


def _drop_metadata(obj: Any) -> None:
    """Remove node metadata (stack traces, module paths, source functions): unused at run time."""
    nodes = obj.get("graph_module", {}).get("graph", {}).get("nodes", [])
    for node in nodes:
        if isinstance(node, dict) and "metadata" in node:
            node["metadata"] = {}


def check_program(program: Any, where: Path) -> None:
    """Refuse a program JSON outside the allow-list of the module docstring (PackageError naming the item)."""
    if not isinstance(program, dict):
        raise PackageError(f"{where}: not a JSON object")
    if program.get("guards_code"):
        raise PackageError(f"{where}: holds guards_code (Python source); a package's program never does")

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key in _REFUSED_ARGUMENTS:
                    raise PackageError(f"{where}: {path}.{key}: graph, operator and custom-object values are refused")
                if key == "target" and isinstance(value, str):
                    _check_target(value, where, path)
                elif key == "expr_str":
                    _check_expr(value, where, path)
                walk(value, f"{path}.{key}")
        elif isinstance(obj, list):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")

    walk(program, "$")


def _check_target(target: str, where: Path, path: str) -> None:
    if target in _OPERATOR_TARGETS:
        return
    if _ATEN_TARGET.fullmatch(target) and target.split(".")[3] not in _DENIED_ATEN:
        return
    raise PackageError(f"{where}: {path}: node target {target!r} is not an ATen operator; refusing the program")


def _check_expr(expr: Any, where: Path, path: str) -> None:
    if not isinstance(expr, str) or _EXPR_TOKEN.sub("", expr) != "" or len(expr) > 10_000:
        raise PackageError(f"{where}: {path}: symbolic expression {str(expr)[:100]!r} is not an integer "
                           "expression of shape symbols; refusing the program")


def load_program(root: Path, files: dict[str, str]) -> Callable[..., Any]:
    """The dense graph as a callable module, read through the allow-list.

    ``files``: the :data:`PROGRAM` / :data:`WEIGHTS` / :data:`CONSTANTS` paths (already
    verified against the manifest).
    """
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    from cdp_rec.serving.package import load_tensors

    program_path = root / files["program"]
    try:
        program = json.loads(program_path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise PackageError(f"{program_path}: unreadable program ({e})") from e
    check_program(program, program_path)
    _drop_metadata(program)
    weights = load_tensors(root / files["weights"])
    constants = load_tensors(root / files["constants"])
    try:
        ep = deserialize(SerializedArtifact(json.dumps(program).encode(), weights, constants, b""))
        module = ep.module()
    except Exception as e:  # a damaged or foreign program; another torch version's schema
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PackageError(f"{program_path}: cannot load the program with torch {torch.__version__} "
                           f"({type(e).__name__}: {first})") from e
    return module


def load_aoti(path: Path) -> Callable[..., Any]:
    """The AOTInductor-compiled graph. Runs native code from ``path``: only for trusted packages."""
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PackageError(f"{path}: cannot load the AOTInductor package ({type(e).__name__}: {first})") from e
