"""A job's input file as items for a package's handler: the file itself, or one item per zip member.

Zip members are hostile: their names never become paths (each is written to a numbered file), absolute
and '..' names reject the archive, and entry count and total size are bounded (zip bombs).
"""

from __future__ import annotations

import posixpath
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from worker.errors import InputError, printable

MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_UNCOMPRESSED_BYTES = 200 * 1024 * 1024
ZIP_EXTENSION = ".zip"
_SAFE_SUFFIX = re.compile(r"^\.[a-z0-9]{1,10}$")


@dataclass(frozen=True)
class InputItem:
    name: str  # for people and results.csv: the key's base name, or the member's name in the zip
    path: Path

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "path": str(self.path)}


def is_unsafe_entry_name(entry: str) -> bool:
    """Absolute paths, drive letters and '..' components: never acceptable."""
    normalized = entry.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        return True
    return ".." in normalized.split("/")


def is_ignored_entry_name(entry: str) -> bool:
    """Directories' clutter: macOS resource forks (__MACOSX/) and dotfiles (.DS_Store, ._x.png)."""
    parts = [part for part in entry.replace("\\", "/").split("/") if part]
    return not parts or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, remaining: int) -> bytes:
    """Read one entry into memory, never more than `remaining` bytes whatever its header claims."""
    too_big = InputError(
        f"{where}: the zip's uncompressed contents exceed the "
        f"{MAX_ZIP_UNCOMPRESSED_BYTES // 2**20} MiB limit; "
        "split it into smaller archives"
    )
    if info.file_size > remaining:
        raise too_big
    try:
        with archive.open(info) as fh:
            data = fh.read(remaining + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{where} cannot be read (corrupt or unsupported compression: {exc})") from exc
    if len(data) > remaining:
        raise too_big
    return data


def expand_items(input_path: Path, name: str, items_dir: Path) -> list[InputItem]:
    """The items of the downloaded input: a .zip gives one per member (written under items_dir)."""
    if input_path.suffix.lower() != ZIP_EXTENSION:
        if input_path.stat().st_size == 0:
            raise InputError(f"{name} is empty (0 bytes); upload a file with something in it")
        return [InputItem(name, input_path)]
    try:
        archive = zipfile.ZipFile(input_path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{name} is not a readable zip archive (corrupt or truncated: {exc})") from exc
    items: list[InputItem] = []
    with archive:
        entries = archive.infolist()
        if len(entries) > MAX_ZIP_ENTRIES:
            raise InputError(f"{name} has {len(entries):,} entries, over the {MAX_ZIP_ENTRIES:,} limit; split it")
        members = []
        for info in entries:
            entry = printable(info.filename)
            if is_unsafe_entry_name(info.filename):
                raise InputError(
                    f"{name} entry {entry!r} has an absolute or '..' path; rebuild the zip with relative names"
                )
            if info.is_dir() or is_ignored_entry_name(info.filename):
                continue
            if info.flag_bits & 0x1:
                raise InputError(f"{name} entry {entry!r} is encrypted; upload an unencrypted zip")
            members.append(info)
        if not members:
            raise InputError(f"{name} contains no files")
        items_dir.mkdir(parents=True, exist_ok=True)
        remaining = MAX_ZIP_UNCOMPRESSED_BYTES
        for index, info in enumerate(members, start=1):
            data = read_entry(archive, info, f"{name} entry {printable(info.filename)!r}", remaining)
            remaining -= len(data)
            suffix = posixpath.splitext(info.filename)[1].lower()
            path = items_dir / f"{index:05d}{suffix if _SAFE_SUFFIX.fullmatch(suffix) else ''}"
            path.write_bytes(data)
            items.append(InputItem(printable(info.filename, limit=1024), path))
    return items
