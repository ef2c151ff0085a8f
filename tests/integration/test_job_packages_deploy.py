"""Job packages through the local cloud: `job deploy` from the CLI, refusals before any instance starts, and a
new version deployed in the middle of a burst (each job runs, and its manifest names, the version it was
accepted with). A key under a mistyped job name (it runs the default job, the digits package, and says so) is
tested in tests/functional/test_routing.py."""

from __future__ import annotations

import csv
import io
import json

import pytest

from batchworker.models import job_id_for

pytestmark = pytest.mark.integration

HANDLER = '''import time


class Job:
    def setup(self, ctx):
        self.tag = (ctx.package_dir / "tag.txt").read_text().strip()

    def process(self, items, ctx):
        for item in items:
            time.sleep(ctx.params["sleep"])
            yield item, {"tag": self.tag, "sleep": ctx.params["sleep"]}
'''
TOML = '''name = "{name}"
entrypoint = "handler:Job"
accept = [".txt"]

[params.sleep]
type = "float"
default = 0.5
min = 0.0
max = 5.0
'''


def write_package(folder, name: str, tag: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(TOML.format(name=name))
    (folder / "handler.py").write_text(HANDLER)
    (folder / "tag.txt").write_text(tag + "\n")
    return folder


def deploy(cloud, folder) -> str:
    result = cloud.cli("job", "deploy", str(folder))
    assert result.returncode == 0, result.stderr
    listed = json.loads(cloud.cli("job", "list", "--json").stdout)
    return next(p["version"] for p in listed if p["name"] == folder.name)


def put(cloud, key: str, body: bytes = b"words", **metadata) -> str:
    response = cloud.client("s3").put_object(Bucket=cloud.input_bucket, Key=key, Body=body, Metadata=metadata)
    return job_id_for(cloud.input_bucket, key, response.get("VersionId") or response.get("ETag"))


def instance_starts(cloud) -> int:
    events = cloud.client("dynamodb").scan(TableName=cloud.env["BATCHWORKER_INSTANCE_EVENTS_TABLE"])["Items"]
    return sum(1 for e in events if e.get("state", {}).get("S") == "start")


def results_tags(cloud, job_id) -> list[str]:
    body = cloud.client("s3").get_object(Bucket=cloud.output_bucket, Key=f"jobs/{job_id}/results.csv")["Body"]
    return [row["tag"] for row in csv.DictReader(io.StringIO(body.read().decode()))]


def test_invalid_package_is_refused_by_deploy(local_cloud, tmp_path):
    folder = write_package(tmp_path / "broken", "broken", "x")
    (folder / "job.toml").write_text(TOML.format(name="broken").replace('type = "float"', 'type = "decimal"'))
    result = local_cloud.cli("job", "deploy", str(folder))
    assert result.returncode == 1 and "decimal" in result.stderr
    listing = local_cloud.client("s3").list_objects_v2(
        Bucket=local_cloud.env["BATCHWORKER_ARTIFACTS_BUCKET"], Prefix="job-packages/broken/"
    )
    assert listing.get("KeyCount", 0) == 0


def test_refused_uploads_fail_with_a_manifest_and_start_nothing(local_cloud, tmp_path):
    deploy(local_cloud, write_package(tmp_path / "sleeper", "sleeper", "v1"))
    local_cloud.wait_until(lambda: set(local_cloud.instance_states()) == {"stopped"}, 60, "every instance stopped")
    starts = instance_starts(local_cloud)
    cases = {
        put(local_cloud, "sleeper/a.txt", **{"param-sleep": "60"}): ["'sleep'", "maximum 5.0"],
        put(local_cloud, "sleeper/a.csv"): ["'sleeper'", ".csv", ".txt"],
    }
    for job_id, words in cases.items():
        manifest = local_cloud.wait_for_manifest(job_id, timeout=60)
        assert manifest["status"] == "failed" and manifest["written_by"] == "control-plane"
        for word in words:
            assert word in manifest["error"], manifest["error"]
        assert local_cloud.job(job_id)["status"] == "FAILED"
    assert instance_starts(local_cloud) == starts, "a refused upload started an instance"
    assert set(local_cloud.instance_states()) == {"stopped"}


def test_deploy_in_the_middle_of_a_burst_loses_nothing(local_cloud, tmp_path):
    folder = write_package(tmp_path / "burst", "burst", "v1")
    v1 = deploy(local_cloud, folder)
    # GIVEN a burst of uploads accepted under v1, the first of them already running
    first = [put(local_cloud, f"burst/a{n}.txt", **{"param-sleep": "1"}) for n in range(4)]
    local_cloud.wait_until(
        lambda: any((local_cloud.job(j) or {}).get("status") in ("RUNNING", "SUCCEEDED") for j in first),
        120, "a job of the burst to run",
    )
    # WHEN v2 is deployed and more uploads arrive
    v2 = deploy(local_cloud, write_package(folder, "burst", "v2"))
    assert v2 != v1
    second = [put(local_cloud, f"burst/b{n}.txt", **{"param-sleep": "0"}) for n in range(4)]
    # THEN every job succeeds once, with the version it was accepted under, and says so
    for job_ids, version, tag in ((first, v1, "v1"), (second, v2, "v2")):
        for job_id in job_ids:
            manifest = local_cloud.wait_for_manifest(job_id, timeout=240)
            assert manifest["status"] == "succeeded", manifest
            assert manifest["package"]["name"] == "burst" and manifest["package"]["version"] == version
            assert results_tags(local_cloud, job_id) == [tag]
    local_cloud.wait_until(lambda: set(local_cloud.instance_states()) == {"stopped"}, 60, "every instance stopped")
