"""scripts/prune_fatbin.py on a hand-built ELF: only the payloads of other SMs become zeros.

(Checked by hand on fbgemm-gpu 1.6.0's libraries: the output of ``prune --keep 90`` is
byte-identical to the bundle that ran on the H200; those libraries are not in CI.)
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import prune_fatbin as P  # noqa: E402

ENTRY_HEADER = 64


def _entry(sm: int, payload: bytes) -> bytes:
    head = bytearray(ENTRY_HEADER)
    struct.pack_into("<HHIQ", head, 0, 2, 0x101, ENTRY_HEADER, len(payload))
    struct.pack_into("<I", head, 28, sm)
    return bytes(head) + payload


def _fatbin(parts: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_entry(sm, payload) for sm, payload in parts)
    return struct.pack("<IHHQ", P.FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf(section: bytes, name: str = ".nv_fatbin") -> bytes:
    """ELF64 LE: header, the section's bytes, .shstrtab, then 3 section headers."""
    strtab = b"\0" + name.encode() + b"\0.shstrtab\0"
    sec_off = 64
    str_off = sec_off + len(section)
    sh_off = (str_off + len(strtab) + 7) // 8 * 8
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, sh_off)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)

    def sh(name_off: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, off, size, 0, 0, 8, 0)

    body = bytes(header) + section + strtab
    body += bytes(sh_off - len(body))
    return body + bytes(64) + sh(1, sec_off, len(section)) + sh(2 + len(name), str_off, len(strtab))


def test_prune_zeroes_only_the_other_sms_and_keeps_the_layout(tmp_path):
    code = {80: b"\x80" * 48, 90: b"\x90" * 40, 100: b"\xa0" * 56}
    section = _fatbin([(80, code[80]), (90, code[90])]) + bytes(8) + _fatbin([(100, code[100])])
    path = tmp_path / "lib.so"
    path.write_bytes(_elf(section))
    before = path.read_bytes()
    assert P.device_code_by_sm(path) == {80: 48, 90: 40, 100: 56}

    assert P.prune(path, {90}) == 48 + 56
    after = path.read_bytes()
    assert len(after) == len(before)
    for e in P.entries(after):  # headers intact, payloads: sm_90 as it was, the rest zeros
        assert after[e.offset:e.offset + ENTRY_HEADER] == before[e.offset:e.offset + ENTRY_HEADER]
        assert after[e.payload] == (code[90] if e.sm == 90 else bytes(e.payload_size))
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(changed) == 48 + 56  # nothing outside the pruned payloads moved
    assert P.prune(path, {90}) == 0 and path.read_bytes() == after  # idempotent


def test_a_library_without_the_kept_sm_is_refused_untouched(tmp_path, capsys):
    path = tmp_path / "lib.so"
    path.write_bytes(_elf(_fatbin([(80, b"\x80" * 16), (100, b"\xa0" * 16)])))
    before = path.read_bytes()
    assert P.main(["prune", "--keep", "90", str(path)]) == 2
    assert "no device code for sm_90 (has sm_80, sm_100)" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_host_only_libraries_and_non_elf_files(tmp_path, capsys):
    host = tmp_path / "host.so"
    host.write_bytes(_elf(b"\0" * 32, name=".text"))
    assert P.prune(host, {90}) == 0 and P.device_code_by_sm(host) == {}
    assert P.main(["list", str(host)]) == 0 and "no device code" in capsys.readouterr().out
    (tmp_path / "x.so").write_bytes(b"not an elf file at all, not even close........................")
    with pytest.raises(P.FatbinError, match="not a 64-bit little-endian ELF"):
        P.prune(tmp_path / "x.so", {90})
    broken = tmp_path / "broken.so"
    fatbin = bytearray(_fatbin([(90, b"\x90" * 16)]))
    struct.pack_into("<Q", fatbin, 16 + 8, 10**6)  # an entry claiming more bytes than its fatbin has
    broken.write_bytes(_elf(bytes(fatbin)))
    with pytest.raises(P.FatbinError, match="does not fit its fatbin"):
        P.prune(broken, {90})


@pytest.mark.parametrize("keep", ["x", ",", "-90", "9 0"])
def test_a_bad_keep_list_is_one_line_and_exit_2(tmp_path, capsys, keep):
    path = tmp_path / "lib.so"
    path.write_bytes(_elf(_fatbin([(90, b"\x90" * 16)])))
    with pytest.raises(SystemExit) as e:
        P.main(["prune", "--keep", keep, str(path)])
    assert e.value.code == 2
    assert "--keep: expected SM numbers such as 90 or 80,90" in capsys.readouterr().err

