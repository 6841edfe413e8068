"""DT_NEEDED entries of an ELF shared object, read without binutils (tests and scripts)."""

from __future__ import annotations

import struct
from pathlib import Path

DT_NEEDED = 1


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object, parsed without binutils."""
    data = path.read_bytes()
    if not (data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1):
        raise ValueError(f"{path}: expected a 64-bit little-endian ELF file")
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz) of PT_LOAD segments
    dynamic: tuple[int, int] | None = None
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        raise ValueError(f"{path}: no PT_DYNAMIC segment")
    entries: list[tuple[int, int]] = []
    off, end = dynamic[0], dynamic[0] + dynamic[1]
    while off < end:
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        entries.append((tag, val))
        off += 16
    strtab_vaddr = next(val for tag, val in entries if tag == 5)  # DT_STRTAB

    def file_offset(vaddr: int) -> int:
        for seg_vaddr, seg_off, seg_size in loads:
            if seg_vaddr <= vaddr < seg_vaddr + seg_size:
                return vaddr - seg_vaddr + seg_off
        raise ValueError(f"address {vaddr:#x} is in no PT_LOAD segment")

    strtab = file_offset(strtab_vaddr)
    names = []
    for tag, val in entries:
        if tag == DT_NEEDED:
            start = strtab + val
            names.append(data[start : data.index(b"\0", start)].decode())
    return names
