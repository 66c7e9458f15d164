"""Writing files and folders so that a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "fx-manifest.json"  # a folder's own list of its files, with sizes and SHA-256, written last


@contextmanager
def naming(target: Path) -> Iterator[None]:
    """An OSError about a temporary path beside ``target`` (``.<name>.<random>...``, a scratch folder ``.fx-...``)
    is reported as about ``target``, the path the user gave or knows, not a name fx made up."""
    try:
        yield
    except OSError as exc:
        name = Path(str(exc.filename)).name if exc.filename else ""
        if not (exc.filename and Path(str(exc.filename)).parent == Path(target).parent and name.startswith(".")
                and name != Path(target).name):
            raise
        raise OSError(exc.errno, exc.strerror, str(target)) from None


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` to a new temporary file beside ``path`` (created exclusively, so a planted link is never
    followed), then rename it over ``path``."""
    path = Path(path)
    data = content.encode() if isinstance(content, str) else content
    with naming(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def atomic_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """A new temporary folder beside ``target`` to fill; on success it is renamed to ``target``.

    ``replace``: an existing ``target`` is removed first. Otherwise a ``target`` that appeared meanwhile (another
    process made the same folder) is kept and this copy discarded. On failure nothing is left behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with naming(target):
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield tmp
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if replace or not target.is_dir():
                raise
            shutil.rmtree(tmp)  # another process finished the same folder first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A new temporary file beside ``path`` for a writer that wants a file name (a large file streamed to disk);
    on success it is renamed over ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # readable as any new file is (a model server may run as another user)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PLACEHOLDERS = ("[More Information Needed]", "fine-tuned version of [None]")  # peft's and trl's empty model cards


def drop_placeholder_card(folder: Path) -> None:
    """Remove the model card peft or trl write beside saved weights when it is their empty template (peft's with
    this machine's path as the base model): it says nothing of the run and would be published as if it did."""
    card = Path(folder) / "README.md"
    try:
        text = card.read_text(errors="replace")
    except OSError:
        return
    if any(p in text for p in PLACEHOLDERS):
        card.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` (links and the manifest left out), by relative name: its size and SHA-256."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}


def mismatches(folder: Path, files: dict[str, Any], hashes: bool = True) -> dict[str, str]:
    """What is wrong with each file a manifest lists (``listing``'s form) that is missing, of another size or, with
    ``hashes``, changed since: name -> a few words."""
    out = {}
    for name, want in files.items():
        file = Path(folder) / name
        try:
            size = file.stat().st_size if file.is_file() else None
            if size is None:
                out[name] = "missing"
            elif size != want.get("size"):
                out[name] = f"{size} bytes, {want.get('size')} written"
            elif hashes and sha256(file) != want.get("sha256"):
                out[name] = "its contents changed after it was written"
        except (OSError, AttributeError) as exc:
            out[name] = f"unreadable ({exc})"
    return out
