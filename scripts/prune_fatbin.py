"""Blank the GPU code of other GPU generations inside CUDA shared libraries (fbgemm-gpu's).

For one job: carrying the CUDA TorchRec stack to a GPU machine that cannot reach a package
index, through a transfer limit. fbgemm-gpu's wheel holds device code for several SM
generations (1.6.0: sm_80, sm_90, sm_100; ~2.4 GB unpacked, 443 MB as a wheel); a machine
runs one. This tool zeroes the payload of every fatbin entry whose SM is not kept, in
place: ELF layout, section sizes and the entries' headers stay as they are (the CUDA
runtime picks the entry for the device and never reads the others), and the zeros
compress to nothing - fbgemm-gpu 1.6.0 kept at sm_90 packs to 82 MB with xz.

    python scripts/prune_fatbin.py list  site/fbgemm_gpu/*.so            # device code per SM
    python scripts/prune_fatbin.py prune --keep 90 site/fbgemm_gpu/*.so  # H100 / H200

A file with device code but none for a kept SM is refused (left untouched): it would not
run on that GPU. What was done with it on 2026-11-30 (H200, torch 2.11 image):
docs/performance.md, "On a GPU".

Format (NVIDIA does not document it; as read by cuobjdump-compatible tools): the
``.nv_fatbin`` section holds fatbins, each a 16-byte header (magic 0xBA55ED50, u16
version, u16 header size, u64 size of its entries) followed by entries: u16 kind, u16
version, u32 header size, u64 payload size (padded), ..., u32 SM at byte 28 of the entry
header; the payload follows the entry header.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
ELF_MAGIC = b"\x7fELF"


class FatbinError(ValueError):
    """Not a 64-bit little-endian ELF file, or a fatbin that does not parse."""


@dataclass(frozen=True)
class Entry:
    """One fatbin entry: its header at ``offset``, its payload right after it."""

    offset: int
    header_size: int
    payload_size: int
    kind: int
    sm: int

    @property
    def payload(self) -> slice:
        start = self.offset + self.header_size
        return slice(start, start + self.payload_size)


def _section(data: bytes | bytearray, name: str) -> tuple[int, int] | None:
    """(file offset, size) of the named section of an ELF64 little-endian image, or None."""
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise FatbinError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    strtab = header(shstrndx)[4]
    want = name.encode()
    for i in range(shnum):
        h = header(i)
        start = strtab + h[0]
        if data[start:data.index(b"\0", start)] == want:
            return h[4], h[5]
    return None


def entries(data: bytes | bytearray) -> Iterator[Entry]:
    """Every entry of every fatbin in the ``.nv_fatbin`` section (none: no device code)."""
    sec = _section(data, ".nv_fatbin")
    if sec is None:
        return
    pos, end = sec[0], sec[0] + sec[1]
    while pos + 16 <= end:
        magic, _version, header_size, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned; skip padding between them
            continue
        at, stop = pos + header_size, pos + header_size + size
        if stop > end:
            raise FatbinError(f"fatbin at {pos:#x} runs past its section")
        while at < stop:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", data, at)
            (sm,) = struct.unpack_from("<I", data, at + 28)
            if entry_header < 32 or at + entry_header + payload > stop:
                raise FatbinError(f"fatbin entry at {at:#x} does not fit its fatbin")
            yield Entry(at, entry_header, payload, kind, sm)
            at += entry_header + payload
        pos = stop


def device_code_by_sm(path: Path) -> Counter[int]:
    """Payload bytes per SM of one file."""
    out: Counter[int] = Counter()
    for e in entries(path.read_bytes()):
        out[e.sm] += e.payload_size
    return out


def prune(path: Path, keep: set[int]) -> int:
    """Zero the payloads of entries whose SM is not in ``keep``; returns the bytes zeroed
    (0 when they already were: the file is then not rewritten).

    Raises FatbinError (file untouched) when the file has device code but none for ``keep``.
    """
    data = bytearray(path.read_bytes())
    found = list(entries(data))
    if found and not any(e.sm in keep for e in found):
        have = ", ".join(f"sm_{s}" for s in sorted({e.sm for e in found}))
        raise FatbinError(f"{path}: no device code for {', '.join(f'sm_{s}' for s in sorted(keep))} (has {have})")
    zeroed = 0
    for e in found:
        if e.sm not in keep and any(data[e.payload]):  # already blank: nothing to do (idempotent)
            data[e.payload] = bytes(e.payload_size)
            zeroed += e.payload_size
    if zeroed:
        path.write_bytes(data)
    return zeroed


def _sm_list(text: str) -> set[int]:
    """``--keep``: a comma list of SM numbers such as ``90`` or ``80,90``."""
    try:
        sms = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        sms = set()
    if not sms or min(sms) <= 0:
        raise argparse.ArgumentTypeError(f"expected SM numbers such as 90 or 80,90, got {text!r}")
    return sms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="device code per SM").add_argument("files", nargs="+", type=Path)
    p = sub.add_parser("prune", help="zero the device code of every SM not kept, in place")
    p.add_argument("--keep", required=True, type=_sm_list, help="comma list of SMs to keep, e.g. 90")
    p.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "list":
            for f in args.files:
                by_sm = device_code_by_sm(f)
                print(f"{f}: " + (", ".join(f"sm_{s} {n / 2**20:.1f} MiB" for s, n in sorted(by_sm.items()))
                                  or "no device code"))
            return 0
        keep = args.keep
        total = sum(prune(f, keep) for f in args.files)
        print(f"zeroed {total / 2**20:.1f} MiB of device code for other SMs than {sorted(keep)}")
        return 0
    except (FatbinError, OSError) as e:
        print(f"prune_fatbin: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
