"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` (real English text).

The package is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (installing it
would pull in R). Its novels live in an R lazy-load database (``data/Rdata.rdb`` + ``.rdx``):
the index (gzip) and each object (zlib) are compressed R serializations (XDR), each novel a character
vector with one text line per element. ``read_rdata`` decodes the subset of R's format they use.
"""

from __future__ import annotations

import gzip
import pathlib
import shutil
import struct
import subprocess
import tempfile
import zlib

PACKAGE = "r-cran-janeaustenr"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


class _Reader:
    """R's XDR serialization, enough for lists, vectors, strings, pairlists and symbols."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        return (self.int() << 32) + self.int() if n == -1 else n

    def header(self):
        if self.data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.pos = 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()  # length of the native encoding's name, which follows
            self.pos += n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 241, 253, 252, 251, 247):  # NULL and special environments
            return None
        if kind == 255:  # reference to an earlier symbol
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # symbol
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:  # pairlist: (tag, value) pairs
            out = {}
            while kind == 2:
                if has_attr:
                    self.item()  # a cell's own attributes: not needed here
                tag = self.item() if has_tag else None
                out[tag if tag is not None else len(out)] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            return out  # the terminating NULL was consumed as `flags`
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if kind in (10, 13):  # logical, integer
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression
            v = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names and kind == 19:
                return dict(zip(names, v))
        return v


def _unserialize(data: bytes):
    r = _Reader(data)
    r.header()
    return r.item()


def read_rdata(folder: str | pathlib.Path) -> dict[str, list[str]]:
    """Every object of an R lazy-load database (``Rdata.rdx`` / ``Rdata.rdb`` in ``folder``)."""
    folder = pathlib.Path(folder)
    raw = (folder / "Rdata.rdx").read_bytes()
    index = _unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw))
    rdb = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        out[name] = _unserialize(zlib.decompress(blob[4:]))  # 4 bytes: uncompressed size
    return out


def fetch(cache: str | pathlib.Path | None = None) -> pathlib.Path:
    """Download and unpack the Debian package once; the folder holding ``Rdata.rdb``."""
    cache = pathlib.Path(cache or pathlib.Path.home() / ".cache" / "jaxquant" / "janeaustenr")
    data = cache / "usr/lib/R/site-library/janeaustenr/data"
    if (data / "Rdata.rdb").exists():
        return data
    if not shutil.which("apt-get"):
        raise RuntimeError(f"fetching Austen's novels needs apt-get ({PACKAGE}); pass a text file instead")
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", PACKAGE]
        if subprocess.run(download, cwd=tmp, capture_output=True).returncode:
            # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            subprocess.run(download, cwd=tmp, check=True, capture_output=True)
        deb = next(pathlib.Path(tmp).glob("*.deb"))
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache)], check=True)
    return data


def novel(name: str = "prideprejudice", folder=None) -> str:
    """One novel's text, its lines joined by newlines."""
    if name not in NOVELS:
        raise ValueError(f"unknown novel {name!r}; choose from {NOVELS}")
    return "\n".join(line or "" for line in read_rdata(folder or fetch())[name])
