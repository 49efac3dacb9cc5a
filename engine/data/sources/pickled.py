"""The CIFAR Python-pickle releases' shared parts: reading the release's files from its
extracted folder or its tarball, and unpickling one of them, each failure one clear line.
CIFAR-10 and CIFAR-100 differ only in their file names and what the pickles hold."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

from engine.errors import UserError


def read_release(path: Path, files: list[str] | tuple[str, ...], folder: str, what: str, *,
                 in_folder_only: bool = False) -> dict[str, bytes]:
    """``{name: bytes}`` of the release's ``files``, from the folder ``path`` (or its
    ``folder`` subfolder) or from the archive ``path``. ``in_folder_only``: in an archive,
    take only members at the top or inside ``folder`` (for generic names like ``train``)."""
    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                blobs = {}
                for member in tar.getmembers():
                    parts = Path(member.name).parts
                    wanted = parts[-1] in files and (not in_folder_only or len(parts) == 1 or parts[-2] == folder)
                    if member.isfile() and wanted:
                        blobs[parts[-1]] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{path} is not a readable {what} archive: {e}") from None
        missing = [n for n in files if n not in blobs]
        if missing:
            raise UserError(f"{path} is not a {what} python archive: missing {', '.join(missing)}")
        return blobs
    if (path / folder).is_dir():
        path = path / folder
    missing = [n for n in files if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path} is not a {what} python folder: missing {', '.join(missing)}")
    return {n: (path / n).read_bytes() for n in files}


def unpickle(blob: bytes, name: str, what: str) -> dict:
    try:
        d = pickle.load(io.BytesIO(blob), encoding="bytes")
    except Exception as e:  # a truncated or foreign file surfaces as many exception types
        raise UserError(f"{what} file {name} is unreadable: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{what} file {name} holds a {type(d).__name__}, not the release's dict")
    return d
