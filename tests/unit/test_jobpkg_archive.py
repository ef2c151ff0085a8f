"""Package archives: deterministic builds, and extraction that refuses hostile archives."""

import gzip
import io
import os
import tarfile

import pytest

from batchworker.jobpkg import UnsafeArchive, build_archive, extract_archive
from batchworker.jobpkg.archive import file_sha256


def make_package(root):
    (root / "weights").mkdir(parents=True)
    (root / "job.toml").write_text('name = "a"\nentrypoint = "handler:Job"\naccept = [".txt"]\n')
    (root / "handler.py").write_text("class Job: ...\n")
    (root / "weights" / "w.bin").write_bytes(os.urandom(2048))
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "handler.cpython-311.pyc").write_bytes(b"cache")
    (root / "stale.pyc").write_bytes(b"cache")
    return root


def test_build_is_deterministic_and_content_addressed(tmp_path):
    package = make_package(tmp_path / "pkg")
    first = build_archive(package, tmp_path / "out1")
    os.utime(package / "handler.py", (1, 1))  # times and caches do not change the version
    (package / "__pycache__" / "other.pyc").write_bytes(b"more cache")
    second = build_archive(package, tmp_path / "out2")
    assert first.sha256 == second.sha256 == file_sha256(first.path)
    assert first.path.name == f"{first.sha256}.tar.gz"
    assert first.files == ("handler.py", "job.toml", "run.sh", "weights/w.bin")
    (package / "handler.py").write_text("class Job: pass\n")
    assert build_archive(package, tmp_path / "out3").sha256 != first.sha256


def test_round_trip_keeps_files_and_exec_bit(tmp_path):
    package = make_package(tmp_path / "pkg")
    info = build_archive(package, tmp_path / "out")
    dest = tmp_path / "cache" / info.sha256
    names = extract_archive(info.path, dest, expected_sha256=info.sha256)
    assert sorted(names) == list(info.files)
    assert (dest / "weights" / "w.bin").read_bytes() == (package / "weights" / "w.bin").read_bytes()
    assert os.stat(dest / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(dest / "handler.py").st_mode & 0o777 == 0o644


def test_symlink_in_package_is_refused(tmp_path):
    package = make_package(tmp_path / "pkg")
    (package / "link").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        build_archive(package, tmp_path / "out")


def test_hash_mismatch_is_refused_before_extraction(tmp_path):
    info = build_archive(make_package(tmp_path / "pkg"), tmp_path / "out")
    with pytest.raises(UnsafeArchive, match="does not match"):
        extract_archive(info.path, tmp_path / "dest", expected_sha256="0" * 64)
    assert not (tmp_path / "dest").exists()


def test_existing_destination_is_refused(tmp_path):
    info = build_archive(make_package(tmp_path / "pkg"), tmp_path / "out")
    (tmp_path / "dest").mkdir()
    with pytest.raises(UnsafeArchive, match="already exists"):
        extract_archive(info.path, tmp_path / "dest")


def hostile(path, entries):
    """A tar.gz from (TarInfo fields, data) pairs, written the way an attacker would."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for fields, data in entries:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


@pytest.mark.parametrize(
    "entries, match",
    [
        ([({"name": "../evil.py"}, b"x")], "outside"),
        ([({"name": "a/../../evil.py"}, b"x")], "outside"),
        ([({"name": "/etc/evil"}, b"x")], "outside"),
        ([({"name": "a\\..\\evil"}, b"x")], "unsafe name"),
        ([({"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, b"")], "link"),
        ([({"name": "hard", "type": tarfile.LNKTYPE, "linkname": "job.toml"}, b"")], "link"),
        ([({"name": "dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, b"")], "device"),
        ([({"name": "fifo", "type": tarfile.FIFOTYPE}, b"")], "link or a device"),
        ([({"name": "a.txt"}, b"1"), ({"name": "a.txt"}, b"2")], "twice"),
    ],
)
def test_hostile_entries_are_refused_and_nothing_lands(tmp_path, entries, match):
    archive = hostile(tmp_path / "bad.tar.gz", [({"name": "ok.txt"}, b"fine"), *entries])
    with pytest.raises(UnsafeArchive, match=match):
        extract_archive(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path / "evil.py").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tar.gz"]  # the temporary folder is gone too


def test_too_many_files(tmp_path):
    archive = hostile(tmp_path / "many.tar.gz", [({"name": f"f{i}"}, b"") for i in range(6)])
    with pytest.raises(UnsafeArchive, match="more than 5 entries"):
        extract_archive(archive, tmp_path / "dest", max_files=5)


def test_decompression_bomb_stops_at_the_limit(tmp_path):
    # 64 MiB of zeros compress to ~64 KiB; the limit stops the stream long before it is all inflated.
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 64 * 1024 * 1024
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1024 * 1024
    with pytest.raises(UnsafeArchive, match="more data"):
        extract_archive(archive, tmp_path / "dest", max_bytes=1024 * 1024)
    assert not (tmp_path / "dest").exists()


def test_bomb_in_an_extended_header_is_bounded(tmp_path):
    archive = tmp_path / "pax.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.txt")
        info.pax_headers = {"comment": "x" * (8 * 1024 * 1024)}
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UnsafeArchive, match="more data"):
        extract_archive(archive, tmp_path / "dest", max_bytes=1024 * 1024, max_files=10)


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b"gzip but not a tar" * 100)])
def test_garbage_is_refused(tmp_path, content):
    archive = tmp_path / "junk.tar.gz"
    archive.write_bytes(content)
    with pytest.raises(UnsafeArchive):
        extract_archive(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
