"""worker.prewarm.default_package: the default job's deploy pointer first, then Terraform's bundled version."""

from __future__ import annotations

import json

from worker.prewarm import default_package
from worker.spec import PackageRef

VERSION = "ab" * 32


class Objects:
    def __init__(self, objects: dict[str, dict]):
        self.objects = objects
        self.read: list[tuple[str, str]] = []

    def get_optional(self, bucket: str, key: str, max_bytes: int) -> bytes | None:
        self.read.append((bucket, key))
        found = self.objects.get(f"{bucket}/{key}")
        return json.dumps(found).encode() if found is not None else None


def test_the_deploy_pointer_wins():
    uri = f"s3://arts/job-packages/digits/{VERSION}.tar.gz"
    storage = Objects({"arts/job-packages/digits/current.json": {"name": "digits", "version": VERSION, "uri": uri},
                       "arts/job-packages/digits/bundled.json": {"version": "cd" * 32}})
    assert default_package(storage, "s3://arts/job-packages/", "digits") == PackageRef("digits", VERSION, uri)


def test_the_bundled_version_before_any_deploy():
    storage = Objects({"arts/job-packages/digits/bundled.json": {"version": VERSION, "config": {}}})
    ref = default_package(storage, "s3://arts/job-packages", "digits")
    assert ref == PackageRef("digits", VERSION, f"s3://arts/job-packages/digits/{VERSION}.tar.gz")


def test_nothing_deployed_prepares_nothing():
    storage = Objects({})
    assert default_package(storage, "s3://arts/job-packages/", "digits") is None
    assert storage.read == [("arts", "job-packages/digits/current.json"), ("arts", "job-packages/digits/bundled.json")]
