"""`shardfx prepare-data OUT.bin`: a small real text as a token file, with no download.

The text is the one Python ships for `help()`: pydoc_data.topics, the pages on
the language's keywords, operators and statements (79 pages, about 466,000 bytes
of UTF-8 on CPython 3.11; other versions differ a little), joined in sorted order. Tokens are its bytes
(byte-level: vocab 256), written as nanoGPT's prepare scripts write theirs: a raw
little-endian uint16 array, no header. OUT.meta.json beside it records
vocab_size, dtype, the token count and the source. The whole file is written;
`shardfx train` holds out its last --val-fraction (10%) for validation.

    shardfx prepare-data data/pydoc.bin
    shardfx train --data data/pydoc.bin --preset tiny --eval-every 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from shardfx.models.tokens import DTYPES, meta_path

NAME = "prepare-data"
HELP = "write Python's pydoc topics as a byte-level token file for `shardfx train --data` (no download)"
SOURCE = "pydoc_data.topics (byte-level UTF-8)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "out", metavar="OUT.bin", help="the token file to write (its folder is made); OUT.meta.json beside it"
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    meta = prepare_pydoc(args.out)
    print(
        f"wrote {args.out}: {meta['tokens']:,} tokens ({meta['dtype']}, vocab {meta['vocab_size']}) "
        f"from {meta['source']}; {meta_path(args.out)}"
    )
    return 0


def pydoc_text() -> str:
    """The pydoc topics, one page after another in sorted order (the same text on every run of one Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def prepare_pydoc(out: str | os.PathLike) -> dict[str, Any]:
    """Write the pydoc text's bytes to `out` (uint16) and its meta JSON; returns the meta."""
    out = Path(out)
    if out.suffix == ".npy" or out.name.endswith(".meta.json"):
        raise ValueError(
            f"OUT {str(out)!r} must be a raw token file name such as data/pydoc.bin, not .npy or .meta.json"
        )
    if out.is_dir():
        raise ValueError(f"OUT {str(out)!r} is a folder; give a file name such as {out / 'pydoc.bin'}")
    tokens = np.frombuffer(pydoc_text().encode("utf-8"), dtype=np.uint8).astype(DTYPES["uint16"])
    meta = {
        "vocab_size": 256,
        "dtype": "uint16",
        "tokens": len(tokens),
        "source": SOURCE,
        "python": sys.version.split()[0],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a reader never sees half a file.
    _write_atomic(out, tokens.tobytes())
    _write_atomic(meta_path(out), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
