"""The package registry in the artifacts bucket, under in-process moto."""

from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from batchworker.jobpkg import DeployConflict, InvalidJobConfig, PackageNotFound, extract_archive
from batchworker.jobpkg.registry import PackageRegistry

BUCKET = "bw-artifacts"


@pytest.fixture
def s3(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def package(root, name="wordstats", body="class Job: ...\n"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.toml").write_text(
        f'name = "{name}"\nentrypoint = "handler:Job"\naccept = [".txt"]\n[params.top]\ntype = "int"\ndefault = 3\n'
    )
    (root / "handler.py").write_text(body)
    return root


def keys(s3):
    return sorted(obj["Key"] for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def at(minute):
    return datetime(2026, 1, 1, 12, minute, tzinfo=timezone.utc)


def test_deploy_uploads_archive_config_and_pointer(s3, tmp_path):
    registry = PackageRegistry(BUCKET, s3)
    result = registry.deploy(package(tmp_path / "p"), now=at(0))
    version = result.ref.version
    assert result.changed and result.previous_version is None
    assert keys(s3) == sorted([
        f"job-packages/wordstats/{version}.tar.gz",
        f"job-packages/wordstats/{version}.json",
        "job-packages/wordstats/current.json",
    ])
    ref = registry.current("wordstats")
    assert ref == result.ref
    assert ref.uri == f"s3://{BUCKET}/job-packages/wordstats/{version}.tar.gz"
    assert ref.to_spec() == {"name": "wordstats", "version": version, "uri": ref.uri}
    assert ref.config.resolve_params({}) == {"top": 3}
    assert ref.deployed_at == "2026-01-01T12:00:00.000Z"
    # The archive that was uploaded unpacks (checked against its version) into the package.
    s3.download_file(BUCKET, f"job-packages/wordstats/{version}.tar.gz", str(tmp_path / "a.tar.gz"))
    extract_archive(tmp_path / "a.tar.gz", tmp_path / "x", expected_sha256=version)
    assert (tmp_path / "x" / "handler.py").read_text() == "class Job: ...\n"


def test_invalid_package_uploads_nothing(s3, tmp_path):
    root = package(tmp_path / "p")
    (root / "job.toml").write_text('name = "Bad Name"\nentrypoint = "handler:Job"\naccept = [".txt"]\n')
    with pytest.raises(InvalidJobConfig, match="name"):
        PackageRegistry(BUCKET, s3).deploy(root)
    assert keys(s3) == []


def test_redeploying_the_same_content_changes_nothing(s3, tmp_path):
    registry = PackageRegistry(BUCKET, s3)
    first = registry.deploy(package(tmp_path / "p"), now=at(0))
    again = registry.deploy(package(tmp_path / "p"), now=at(5))
    assert not again.changed and again.ref == first.ref
    assert registry.history("wordstats") == []


def test_new_version_then_rollback_then_nothing_left(s3, tmp_path):
    registry = PackageRegistry(BUCKET, s3)
    v1 = registry.deploy(package(tmp_path / "p"), now=at(0)).ref.version
    result = registry.deploy(package(tmp_path / "p", body="class Job: pass\n"), now=at(1))
    v2 = result.ref.version
    assert v2 != v1 and result.previous_version == v1
    assert registry.current("wordstats").version == v2
    assert registry.history("wordstats") == [{"version": v1, "deployed_at": "2026-01-01T12:00:00.000Z"}]
    back = registry.rollback("wordstats", now=at(2))
    assert back.ref.version == v1 and back.previous_version == v2
    assert registry.current("wordstats").deployed_at == "2026-01-01T12:02:00.000Z"
    # Both versions stay in the bucket: jobs pinned to v2 can still fetch it.
    assert f"job-packages/wordstats/{v2}.tar.gz" in keys(s3)
    with pytest.raises(PackageNotFound, match="nothing to roll back"):
        registry.rollback("wordstats")


def test_list_and_unknown_names(s3, tmp_path):
    registry = PackageRegistry(BUCKET, s3)
    registry.deploy(package(tmp_path / "a", name="wordstats"), now=at(0))
    registry.deploy(package(tmp_path / "b", name="digits"), now=at(1))
    assert registry.names() == ["digits", "wordstats"]
    assert [ref.name for ref in registry.list()] == ["digits", "wordstats"]
    assert registry.current("nothing") is None
    assert registry.current("../etc") is None
    with pytest.raises(PackageNotFound, match="job deploy"):
        registry.require("nothing")
    with pytest.raises(PackageNotFound):
        registry.rollback("nothing")


def test_racing_deploys_one_wins_the_other_is_told(s3, tmp_path):
    # GIVEN two deploys that both read the pointer before either wrote it
    registry = PackageRegistry(BUCKET, s3)
    registry.deploy(package(tmp_path / "p"), now=at(0))
    real_read = registry._read_pointer
    stale = real_read("wordstats")
    winner = registry.deploy(package(tmp_path / "q", body="class Job: 1\n"), now=at(1)).ref.version
    registry._read_pointer = lambda name: stale
    # WHEN the slower one writes with the ETag it read
    with pytest.raises(DeployConflict, match="same moment"):
        registry.deploy(package(tmp_path / "r", body="class Job: 2\n"), now=at(2))
    # THEN the first deploy's version stays current, with its history intact
    registry._read_pointer = real_read
    assert registry.current("wordstats").version == winner
    assert len(registry.history("wordstats")) == 1


def test_racing_first_deploys_one_wins(s3, tmp_path):
    registry = PackageRegistry(BUCKET, s3)
    registry._read_pointer = lambda name: (None, None)  # both saw no package yet
    first = registry.deploy(package(tmp_path / "p"), now=at(0)).ref.version
    with pytest.raises(DeployConflict):
        registry.deploy(package(tmp_path / "q", body="class Job: 1\n"), now=at(1))
    del registry._read_pointer
    assert registry.current("wordstats").version == first


def ship_like_terraform(s3, bundle_dir, index):
    """What terraform/s3.tf aws_s3_object.default_job does with scripts/bundle_default_job.py's output."""
    for name in (f"{index['version']}.tar.gz", f"{index['version']}.json", "bundled.json"):
        s3.upload_file(str(bundle_dir / name), BUCKET, f"job-packages/{index['name']}/{name}")


def test_bundled_default_job_until_a_deploy_and_back_by_rollback(s3, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from bundle_default_job import bundle

    # GIVEN Terraform shipped the bundled default job (no pointer yet)
    root = package(tmp_path / "digits", name="digits")
    index = bundle(root, tmp_path / "bundle")
    assert bundle(root, tmp_path / "bundle2") == index  # same folder, same version
    ship_like_terraform(s3, tmp_path / "bundle", index)
    registry = PackageRegistry(BUCKET, s3)
    ref = registry.current("digits")
    assert (ref.version, ref.source, ref.deployed_at) == (index["version"], "bundled", "")
    assert registry.names() == ["digits"]
    # WHEN a new version is deployed, it wins; a rollback returns to the bundled version
    new = registry.deploy(package(tmp_path / "digits", name="digits", body="class Job: 2\n"), now=at(0))
    assert new.previous_version == index["version"] and registry.current("digits").version == new.ref.version
    back = registry.rollback("digits", now=at(1))
    assert back.ref.version == index["version"] and registry.current("digits").source == "rollback"
    with pytest.raises(PackageNotFound):
        registry.rollback("digits")
