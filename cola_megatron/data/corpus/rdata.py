"""Read objects out of an R lazy-load database (`name.rdx` + `name.rdb`) with the standard library.

R packages ship their data sets this way. Only the subset of R's serialisation format that plain
data uses is supported: vectors (character, integer, double, logical, list), pairlists, symbols,
attributes, references and compact integer/real sequences. Anything else raises `RDataError`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cola_megatron.errors import DataError


class RDataError(DataError):
    """The file is not R serialisation data this reader understands."""


# SEXP type codes (R internals, "serialize.c").
NILSXP, SYMSXP, LISTSXP = 0, 1, 2
LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, VECSXP = 10, 13, 14, 15, 16, 19
CHARSXP = 9
ALTREP_SXP, REFSXP, NILVALUE_SXP = 238, 255, 254
# Pseudo-types written for well-known singletons; they carry no payload.
_SINGLETONS = {242: "emptyenv", 241: "baseenv", 253: "globalenv", 252: "unbound", 251: "missing",
               247: "basenamespace"}

_NA_INTEGER = -(2**31)
_UTF8_MASK, _LATIN1_MASK = 1 << 3, 1 << 2


@dataclass
class RVector:
    """An R vector with its attributes (e.g. `names`)."""

    type: int
    values: list
    attributes: dict[str, Any] = field(default_factory=dict)

    def named(self) -> dict[str, Any]:
        names = self.attributes.get("names")
        if names is None:
            raise RDataError("R vector has no names attribute")
        return dict(zip(names.values, self.values))


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError("R serialisation data ends early (truncated file?)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two 32-bit halves
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise RDataError(f"unsupported R serialisation format {fmt!r} (only XDR 'X\\n' is read)")
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # minimal R version to read it
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialisation version {version}")

    def item(self) -> Any:
        flags = self.int()
        sxp = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sxp == NILVALUE_SXP:
            return None
        if sxp in _SINGLETONS:
            return _SINGLETONS[sxp]
        if sxp == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sxp == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if sxp == CHARSXP:
            return self._charsxp(flags)
        if sxp == LISTSXP:
            return self._pairlist(has_attr, has_tag)
        if sxp in (LGLSXP, INTSXP):
            n = self.length()
            values = [None if v == _NA_INTEGER else v for v in struct.unpack(f">{n}i", self.take(4 * n))]
        elif sxp == REALSXP:
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif sxp in (STRSXP, VECSXP):
            values = [self.item() for _ in range(self.length())]
        elif sxp == ALTREP_SXP:
            return self._altrep()
        else:
            raise RDataError(f"unsupported R object type {sxp} in serialised data")
        vector = RVector(sxp, values)
        if has_attr:
            vector.attributes = self._attributes(self.item())
        return vector

    def _charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        levels = flags >> 12
        return raw.decode("latin-1" if levels & _LATIN1_MASK and not levels & _UTF8_MASK else "utf-8")

    def _pairlist(self, has_attr: bool, has_tag: bool) -> list[tuple[Any, Any]]:
        # A pairlist is a linked list; walk it iteratively to keep the recursion shallow.
        cells = []
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            cells.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF != LISTSXP:
                self.pos -= 4
                self.item()  # the terminating NULL
                return cells
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def _altrep(self) -> RVector:
        info, state, attributes = self.item(), self.item(), self.item()
        cls = info[0][1] if isinstance(info, list) and info else None
        if cls == "compact_intseq" or cls == "compact_realseq":
            n, start, step = (int(v) for v in state.values)
            vtype = INTSXP if cls == "compact_intseq" else REALSXP
            vector = RVector(vtype, [start + i * step for i in range(n)])
        elif cls in ("wrap_integer", "wrap_real", "wrap_string", "wrap_logical", "wrap_list"):
            vector = state.values[0]
        else:
            raise RDataError(f"unsupported ALTREP class {cls!r} in serialised data")
        if attributes is not None:
            vector.attributes = self._attributes(attributes)
        return vector

    @staticmethod
    def _attributes(pairlist: Any) -> dict[str, Any]:
        return {tag: value for tag, value in pairlist} if isinstance(pairlist, list) else {}


def unserialize(data: bytes) -> Any:
    """Decode one R object serialised with `serialize(..., xdr=TRUE)` (uncompressed bytes)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress_blob(blob: bytes) -> bytes:
    """Decompress one object blob of an `.rdb` file: 4-byte length, then an optional method tag."""
    if len(blob) < 5:
        raise RDataError("R lazy-load blob is too short")
    size = struct.unpack(">I", blob[:4])[0]
    tag = blob[4:5]
    if tag == b"2":
        out = bz2.decompress(blob[5:])
    elif tag == b"Z":
        out = lzma.decompress(blob[5:])
    elif tag == b"0":
        out = blob[5:]
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise RDataError(f"R lazy-load blob decompressed to {len(out)} bytes, expected {size}")
    return out


def read_lazyload_db(prefix: str | Path, names: list[str] | None = None) -> dict[str, Any]:
    """Read the objects of a lazy-load database `prefix.rdx` / `prefix.rdb` (all, or those named)."""
    rdx, rdb = Path(f"{prefix}.rdx"), Path(f"{prefix}.rdb")
    for path in (rdx, rdb):
        if not path.is_file():
            raise RDataError(f"R lazy-load database file missing: {path}")
    index = unserialize(gzip.decompress(rdx.read_bytes()))
    if not isinstance(index, RVector):
        raise RDataError(f"{rdx} does not hold an R lazy-load index")
    variables = index.named()["variables"].named()
    wanted = list(variables) if names is None else names
    out = {}
    with open(rdb, "rb") as f:
        for name in wanted:
            if name not in variables:
                raise RDataError(f"object {name!r} not in {rdx}; it holds {sorted(variables)}")
            offset, length = variables[name].values
            f.seek(offset)
            out[name] = unserialize(_decompress_blob(f.read(length)))
    return out
