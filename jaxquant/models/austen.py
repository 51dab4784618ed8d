"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` (real English text).

``scripts/fetch_austen.sh`` downloads the package and copies its R lazy-load database
(``Rdata.rdb`` + ``Rdata.rdx``) into ``$JAXQUANT_AUSTEN_DIR`` (default
``~/.cache/jaxquant/austen``); ``scripts/bootstrap.sh`` runs it for the ``test``, ``models`` and
``experiments`` extras. The index (``.rdx``) is a gzip-ed R serialization mapping each object to an
(offset, length) slice of the ``.rdb``; each slice is a 4-byte uncompressed size followed by a
zlib-compressed R serialization. PyPI ``rdata`` parses the serializations; each novel is a
character vector, one text line per element.

Example (after ``bash scripts/fetch_austen.sh``)::

    >>> from jaxquant.models import austen
    >>> austen.novel("prideprejudice").split("\\n")[0]
    'PRIDE AND PREJUDICE'
"""

from __future__ import annotations

import os
import pathlib
import zlib

import rdata

NOVELS = (
    "sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"
)
FETCH_SCRIPT = "scripts/fetch_austen.sh"


def data_dir() -> pathlib.Path:
    """The folder read by default: ``$JAXQUANT_AUSTEN_DIR``, else ``~/.cache/jaxquant/austen``."""
    env = os.environ.get("JAXQUANT_AUSTEN_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jaxquant" / "austen"


def read_rdata(folder: str | pathlib.Path) -> dict[str, list[str]]:
    """Every object of the R lazy-load database ``Rdata.rdx`` + ``Rdata.rdb`` in ``folder``.

    Each object must be a character vector; it comes back as a list of lines (NA as "").

    Raises:
      FileNotFoundError: the database is not in ``folder`` (run ``scripts/fetch_austen.sh``).
      ValueError: the database uses a compression other than zlib.
    """
    folder = pathlib.Path(folder)
    if not (folder / "Rdata.rdb").exists() or not (folder / "Rdata.rdx").exists():
        raise FileNotFoundError(
            f"Austen's novels are not in {str(folder)!r} (no Rdata.rdb / Rdata.rdx): run "
            f"`bash {FETCH_SCRIPT}` (it needs apt-get), or set JAXQUANT_AUSTEN_DIR to the "
            "folder holding them"
        )
    index = rdata.read_rds(folder / "Rdata.rdx")  # read_rds undoes the gzip itself
    compressed = int(index["compressed"][0])
    if compressed != 1:
        # R marks zlib as TRUE; 2 (bzip2) and 3 (xz) add a type byte after the size, 0 is raw
        raise ValueError(f"only zlib-compressed lazy-load databases are read, got {compressed=}")
    rdb = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset):int(offset) + int(length)]
        # 4 bytes of uncompressed size, then zlib; extension=".rds": a bare serialization, no header
        parsed = rdata.parser.parse_data(zlib.decompress(blob[4:]), extension=".rds")
        value = rdata.conversion.convert(parsed)
        out[str(name)] = ["" if line is None else str(line) for line in value]
    return out


def novel(name: str = "prideprejudice", folder: str | pathlib.Path | None = None) -> str:
    """One novel's text, its lines joined by newlines.

    Args:
      name: one of ``NOVELS``.
      folder: the folder holding ``Rdata.rdb`` / ``Rdata.rdx``; default ``data_dir()``.

    Raises:
      ValueError: ``name`` is not one of ``NOVELS``.
      FileNotFoundError: the novels have not been fetched (run ``scripts/fetch_austen.sh``).
    """
    if name not in NOVELS:
        raise ValueError(f"unknown novel {name!r}; choose from {NOVELS}")
    return "\n".join(read_rdata(folder if folder is not None else data_dir())[name])
