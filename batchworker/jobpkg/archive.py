"""The package archive: a deterministic tar.gz of the package folder, named by the sha256 of its bytes.

The same folder always gives the same bytes (sorted entries, fixed times, owners and modes), so the sha256
is the version. `extract_archive` unpacks archives that came over the network and treats them as hostile.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from batchworker.jobpkg.errors import UnsafeArchive

ARCHIVE_SUFFIX = ".tar.gz"
# Never shipped: caches and local clutter that differ between machines and would change the version.
EXCLUDED_NAMES = frozenset({"__pycache__", ".git", ".hg", ".svn", ".venv", ".mypy_cache", ".pytest_cache",
                            ".ruff_cache", ".DS_Store", ".ipynb_checkpoints"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
MAX_FILES = 10_000
MAX_UNPACKED_BYTES = 4 * 1024**3  # model weights ship inside; an instance disk holds several versions
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    sha256: str
    size_bytes: int
    files: tuple[str, ...]

    @property
    def version(self) -> str:
        return self.sha256


def package_files(package_dir: Path) -> list[str]:
    """The files that ship, as sorted POSIX paths relative to the package; links and special files are refused."""
    root = Path(package_dir)
    if not root.is_dir():
        raise UnsafeArchive(f"{root} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_NAMES)
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                raise UnsafeArchive(
                    f"{relative} is a symbolic link; packages ship plain files only (copy the target in instead)"
                )
            if name in dirnames:
                continue
            if name in EXCLUDED_NAMES or name.endswith(EXCLUDED_SUFFIXES):
                continue
            if not stat.S_ISREG(path.lstat().st_mode):
                raise UnsafeArchive(f"{relative} is not a regular file")
            found.append(relative)
    if len(found) > MAX_FILES:
        raise UnsafeArchive(f"{root} has {len(found)} files, over the {MAX_FILES}-file limit of a package")
    return sorted(found)


def build_archive(package_dir: Path, dest_dir: Path) -> ArchiveInfo:
    """Write `<dest_dir>/<sha256>.tar.gz` for the folder; building twice gives the same file."""
    root = Path(package_dir)
    files = package_files(root)
    total = sum((root / name).stat().st_size for name in files)
    if total > MAX_UNPACKED_BYTES:
        raise UnsafeArchive(f"{root} holds {total} bytes, over the {MAX_UNPACKED_BYTES}-byte limit of a package")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=dest_dir, prefix=".archive-", suffix=ARCHIVE_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in files:
                    path = root / name
                    info = tarfile.TarInfo(name)
                    status = path.stat()
                    info.size = status.st_size
                    info.mode = 0o755 if status.st_mode & stat.S_IXUSR else 0o644
                    info.mtime = 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with open(path, "rb") as body:
                        tar.addfile(info, body)
        digest = file_sha256(Path(temp_name))
        os.chmod(temp_name, 0o644)  # mkstemp makes it 0600; the archive is no secret
        final = dest_dir / f"{digest}{ARCHIVE_SUFFIX}"
        os.replace(temp_name, final)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return ArchiveInfo(path=final, sha256=digest, size_bytes=final.stat().st_size, files=tuple(files))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as body:
        for chunk in iter(lambda: body.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    expected_sha256: str | None = None,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_files: int = MAX_FILES,
) -> list[str]:
    """Unpack a package archive into `dest` (which must not exist yet); return the file names.

    Everything is checked before a byte lands in `dest`: the sha256 (when given), then each entry while it
    streams into a sibling temporary folder (regular files and folders only, relative paths that stay inside,
    no duplicates, at most `max_files` entries and `max_bytes` of decompressed data, headers included). The
    folder is renamed to `dest` only when all of it passed, so `dest` is either complete or absent.
    """
    archive, dest = Path(archive), Path(dest)
    if expected_sha256 is not None and file_sha256(archive) != expected_sha256:
        raise UnsafeArchive(f"{archive.name} does not match its version {expected_sha256[:12]}; download it again")
    if dest.exists():
        raise UnsafeArchive(f"{dest} already exists; extract into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extract-"))
    try:
        names = _extract_into(archive, temp, max_bytes, max_files)
        os.rename(temp, dest)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return names


def _extract_into(archive: Path, root: Path, max_bytes: int, max_files: int) -> list[str]:
    seen: set[str] = set()
    names = []
    # Headers count toward the budget too: a bomb may hide in a giant extended header, not only in a file.
    budget = max_bytes + (max_files + 8) * 3 * tarfile.BLOCKSIZE
    try:
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            stream = _BoundedReader(gz, budget)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for count, member in enumerate(tar, start=1):
                    if count > max_files:
                        raise UnsafeArchive(f"archive has more than {max_files} entries")
                    name = _safe_name(member.name)
                    if name in seen:
                        raise UnsafeArchive(f"archive holds {name!r} twice")
                    seen.add(name)
                    target = root.joinpath(*PurePosixPath(name).parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isreg():
                        raise UnsafeArchive(f"archive entry {name!r} is a link or a device; only plain files may ship")
                    _write_member(tar, member, target, root)
                    names.append(name)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise UnsafeArchive(f"{archive.name} is not a readable package archive: {exc}") from exc
    return names


def _safe_name(name: str) -> str:
    if not name or "\\" in name or "\x00" in name:
        raise UnsafeArchive(f"archive entry {name!r} has an unsafe name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or path.parts == (".",):
        raise UnsafeArchive(f"archive entry {name!r} points outside the package")
    return path.as_posix()


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, root: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Only folders this function created lie between root and target; a link there would mean tampering.
    if not target.parent.resolve().is_relative_to(root.resolve()):
        raise UnsafeArchive(f"archive entry {member.name!r} points outside the package")
    source = tar.extractfile(member)
    mode = 0o755 if member.mode & 0o100 else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)


class _BoundedReader(io.RawIOBase):
    """A read-only stream that raises UnsafeArchive once more than `limit` bytes were read from it."""

    def __init__(self, inner, limit: int):
        self.inner = inner
        self.remaining = limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size if size >= 0 else self.remaining + 1)
        self.remaining -= len(data)
        if self.remaining < 0:
            raise UnsafeArchive("archive unpacks to more data than a package may hold")
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
