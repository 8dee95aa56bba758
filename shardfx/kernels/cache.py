"""Generated kernel modules on disk, keyed by a hash of their source and shapes.

An entry is `<key>.py` (the module Triton's @jit reads its source from) and
`<key>.json` (the sha256 of that source and the shapes it was made for). On a
hit the file is hashed again; an entry whose text or record does not match, or
that fails to import, is rewritten from the source in hand, never trusted.
Triton keeps its compiled binaries in its own cache (TRITON_CACHE_DIR).

The folder is, first found: the `directory` argument (the pass's
`kernel_cache_dir` option), $SHARDFX_KERNEL_CACHE, ~/.cache/shardfx/kernels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType


def default_dir() -> Path:
    env = os.environ.get("SHARDFX_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "shardfx" / "kernels"


def cache_key(source: str, shapes: str) -> str:
    import triton

    text = "\n".join([source, shapes, f"triton {triton.__version__}"])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class CacheStats:
    hits: int = 0
    writes: int = 0
    rebuilt: int = 0  # entries found corrupt and rewritten
    loaded: list[str] = field(default_factory=list)


STATS = CacheStats()


def load(source: str, shapes: str, directory: str | Path | None = None) -> tuple[str, ModuleType]:
    """The module of `source` for `shapes`, from the cache folder (written there first on a miss)."""
    folder = Path(directory) if directory else default_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, shapes)
    path, record = folder / f"{key}.py", folder / f"{key}.json"
    digest = hashlib.sha256(source.encode()).hexdigest()
    state = _check(path, record, digest, shapes)
    if state == "ok":
        STATS.hits += 1
    else:
        if state == "corrupt":
            STATS.rebuilt += 1
        _write(path, record, source, digest, shapes)
        STATS.writes += 1
    try:
        module = _import(key, path)
    except (SyntaxError, ImportError, NameError):
        if state != "ok":
            raise  # freshly written and still broken: a codegen bug, not a cache problem
        STATS.rebuilt += 1
        _write(path, record, source, digest, shapes)
        module = _import(key, path)
    STATS.loaded.append(key)
    return key, module


def _check(path: Path, record: Path, digest: str, shapes: str) -> str:
    if not path.exists() and not record.exists():
        return "missing"
    try:
        info = json.loads(record.read_text())
        text = path.read_bytes()
    except (OSError, ValueError):
        return "corrupt"
    if info.get("sha256") != digest or info.get("shapes") != shapes or hashlib.sha256(text).hexdigest() != digest:
        return "corrupt"
    return "ok"


def _write(path: Path, record: Path, source: str, digest: str, shapes: str) -> None:
    for target, text in ((path, source), (record, json.dumps({"sha256": digest, "shapes": shapes}, indent=1))):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)  # atomic: a reader sees the old entry or the new one


def _import(key: str, path: Path) -> ModuleType:
    name = f"shardfx_kernel_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton's @jit looks its function up through the module
    spec.loader.exec_module(module)
    return module
