"""Versioned ``.npz`` files: a JSON header plus named float/str arrays, never pickled objects,
written atomically (temporary file in the same folder, fsync, rename) so a crash cannot leave a
half-written model or index behind."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np


class FileFormatError(ValueError):
    """A file that is not what it should be; the message is one line naming the file."""


def create_file(path):
    """A new file opened for writing, with the user's umask applied (``tempfile`` forces 0600)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path, write, before_rename=None, after_rename=None) -> None:
    """``write(f)`` into a temporary sibling (``tmp-…``), fsync, rename over ``path``, fsync the
    folder: after a crash ``path`` holds the old file or the new one, whole. The two hooks let the
    fault-injection tests stop a process either side of the rename."""
    path = Path(path)
    tmp = path.with_name(f"tmp-{os.urandom(6).hex()}-{path.name}")
    try:
        with create_file(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if after_rename:
        after_rename()
    fsync_dir(path.parent)


def atomic_savez(path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durable(path, lambda f: np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays))


def load_npz(path, fmt: str, max_version: int) -> tuple[dict, dict[str, np.ndarray]]:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        # numpy's own message (advice about allow_pickle, say) means nothing to a user
        what = "no convlad header" if isinstance(e, KeyError) else "not an .npz of arrays"
        raise FileFormatError(f"{path}: not a convlad file ({what})") from None
    check_header(path, meta, fmt, max_version)
    return meta, arrays


def check_header(path, meta: dict, fmt: str, max_version: int, what: str = "file") -> None:
    """The format name and version of a convlad file's JSON header (a model, an index manifest)."""
    if meta.get("format") != fmt:
        raise FileFormatError(f"{path}: expected a {fmt} {what}, found {meta.get('format')!r}")
    if meta.get("version", 0) > max_version:
        raise FileFormatError(f"{path}: {fmt} version {meta['version']} is newer than this convlad reads "
                              f"({max_version}); upgrade convlad")
