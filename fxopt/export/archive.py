"""The container of an ``.fxopt`` file: one zip archive of two members,
``fxopt/manifest.json`` (the graph, the module tree and the report as JSON,
``fxopt.export.fileformat``; deflated since format 3: JSON shrinks 5-10x, and the report's
~0.4 kB a pass was a fifth of a small int8 model's file) and ``fxopt/tensors.safetensors``
(stored: the tensors are read in place, and int8 codes do not compress).

Writing goes to a temporary file beside the destination, renamed into place: a failed save
leaves nothing behind. Reading refuses, with a ``FileFormatError`` and a hint, what is not such
an archive before anything in it is decoded: a missing path or a folder, an empty or truncated
file, a pickle (fxopt format 1 was ``torch.save``; unpickling can run any code), a manifest too
large (its declared size, and what it inflates to: no zip bomb gets past ``MAX_MANIFEST``),
compressed tensors or a compression other than deflate, a missing member. ``bad`` is the
error every reader of the file raises for a file it refuses.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

from fxopt.errors import FileFormatError

__all__ = ["FORMAT_VERSION", "MANIFEST", "TENSORS", "UNSAFE_HINT", "bad", "write_archive",
           "read_archive"]

FORMAT_VERSION = 3  # 1 was a pickle (torch.save of the GraphModule): refused; 2 stored the
# manifest, 3 deflates it (both read)
MANIFEST = "fxopt/manifest.json"
TENSORS = "fxopt/tensors.safetensors"
MAX_MANIFEST = 256 << 20
_MANIFEST_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # format 2, format 3

UNSAFE_HINT = ("load only files written by OptimizedModule.save (fxopt file format "
               f"{FORMAT_VERSION} or older): this one was edited, damaged or crafted; save the "
               "module again")

OLD_HINT = ("if you wrote the file yourself with an older fxopt and trust it, convert it once: "
            "m = torch.load(path, weights_only=False) (this runs code from the file); "
            "fxopt.OptimizedModule(m['graph_module'], fxopt.Report.from_dict(m['report']), "
            "m['target']).save(new_path)")


def bad(path: Path, what: str, hint: str = UNSAFE_HINT) -> FileFormatError:
    """The error for a file ``path`` that is refused: ``what`` is wrong with it."""
    return FileFormatError(f"{path}: {what}", hint=hint)


def write_archive(path: Path, manifest: str, tensors: bytes) -> None:
    """The archive of ``manifest`` (JSON text) and ``tensors`` (safetensors bytes) at ``path``,
    atomically."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(MANIFEST, manifest, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr(TENSORS, tensors)
    _atomic_write(path, buf.getvalue())


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise FileFormatError(f"cannot write {path}: {e.strerror or e}",
                              hint="save to a writable folder") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FileFormatError(f"cannot write {path}: {e.strerror or e}",
                              hint="save to a writable file path (not a folder)") from e


def read_archive(path: Path) -> tuple[bytes, bytes]:
    """The manifest's and the tensors' bytes of the archive at ``path`` (see the module doc)."""
    if not path.exists():
        raise FileFormatError(f"no such file: {path}", hint="check the path given to save()")
    if path.is_dir():
        raise FileFormatError(f"{path} is a folder, not an fxopt file",
                              hint="pass the file OptimizedModule.save wrote")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileFormatError(f"cannot read {path}: {e.strerror or e}",
                              hint="check the file's permissions") from e
    if not raw:
        raise bad(path, "the file is empty", "save the module again: the file holds nothing")
    if raw[:1] == b"\x80":
        raise bad(path, "not an fxopt module file: it is a pickle, which fxopt does not load "
                   "(loading one can run any code in it)", OLD_HINT)
    try:
        z = zipfile.ZipFile(io.BytesIO(raw))
        names = z.namelist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise bad(path, "not an fxopt module file (not a zip archive, or a truncated one)",
                   "save the module again with OptimizedModule.save") from e
    with z:
        if MANIFEST not in names:
            if any(n.endswith("data.pkl") for n in names):
                raise bad(path, "not an fxopt module file: it is a torch.save pickle (fxopt "
                           "format 1, or another file), which fxopt does not load (loading one "
                           "can run any code in it)", OLD_HINT)
            raise bad(path, "not an fxopt module file (no fxopt/manifest.json in it)",
                       "pass a file written by OptimizedModule.save")
        try:
            info = z.getinfo(MANIFEST)
            if info.file_size > MAX_MANIFEST:
                raise bad(path, f"its manifest is {info.file_size} bytes, too large")
            if any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist()
                   if i.filename != MANIFEST) or info.compress_type not in _MANIFEST_METHODS:
                raise bad(path, "it has compressed members other than a deflated manifest "
                                "(save stores the tensors)")
            with z.open(MANIFEST) as f:  # bounded: a header may lie about the inflated size
                manifest = f.read(MAX_MANIFEST + 1)
            if len(manifest) > MAX_MANIFEST:
                raise bad(path, f"its manifest inflates past {MAX_MANIFEST} bytes")
            tensors = z.read(TENSORS) if TENSORS in names else None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise bad(path, f"the archive is corrupt or truncated ({e})",
                       "save the module again with OptimizedModule.save") from e
    if tensors is None:
        raise bad(path, f"{TENSORS} is missing from the archive")
    return manifest, tensors
