"""The three example job packages end to end through the local cloud: deploy, upload under <name>/, the
instance's runner with the package's environment, results in S3 (digits: the version Terraform bundled)."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import pytest

from batchworker.models import job_id_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "jobs"
SAMPLES = REPO / "samples"


def put(cloud, key: str, body: bytes, **params: str) -> str:
    metadata = {f"param-{name}": value for name, value in params.items()}
    response = cloud.client("s3").put_object(Bucket=cloud.input_bucket, Key=key, Body=body, Metadata=metadata)
    return job_id_for(cloud.input_bucket, key, response.get("VersionId") or response.get("ETag"))


def read(cloud, key: str) -> bytes:
    return cloud.client("s3").get_object(Bucket=cloud.output_bucket, Key=key)["Body"].read()


def rows(cloud, job_id: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(read(cloud, f"jobs/{job_id}/results.csv").decode())))


def test_the_three_examples_run_end_to_end(local_cloud):
    if not (EXAMPLES / "tabular" / "model" / "iris.json").exists():
        pytest.skip("make build trains the tabular example")
    # GIVEN the tabular and edges packages deployed (digits is bundled by terraform apply)
    for name in ("tabular", "edges"):
        deployed = local_cloud.cli("job", "deploy", str(EXAMPLES / name))
        assert deployed.returncode == 0, deployed.stderr
    images = io.BytesIO()
    with zipfile.ZipFile(images, "w") as archive:
        for name in ("digit-0.png", "digit-7.png"):
            archive.write(SAMPLES / name, f"scans/{name}")
    # WHEN files are uploaded under their names, with parameters as S3 metadata
    tabular = put(local_cloud, "tabular/flowers.csv", (EXAMPLES / "tabular" / "sample" / "flowers.csv").read_bytes(),
                  probabilities="false")
    edges = put(local_cloud, "edges/batch.zip", images.getvalue(), format="npy")
    digits = put(local_cloud, "digits/digit-3.png", (SAMPLES / "digit-3.png").read_bytes())
    manifests = {job: local_cloud.wait_for_manifest(job, timeout=300) for job in (tabular, edges, digits)}
    # THEN each ran its package, with its environment, and wrote its rows and files
    for job, manifest in manifests.items():
        assert manifest["status"] == "succeeded", manifest
        assert manifest["outputs"][-1] == f"jobs/{job}/job.log"
        assert f"jobs/{job}/results.csv" in manifest["outputs"] and f"jobs/{job}/errors.jsonl" in manifest["outputs"]
    assert [manifests[j]["package"]["name"] for j in (tabular, edges, digits)] == ["tabular", "edges", "digits"]
    assert manifests[tabular]["environment"]["key"] != "base"  # pandas + scikit-learn: its own venv
    assert manifests[edges]["environment"]["key"] == manifests[digits]["environment"]["key"] == "base"

    (summary,) = rows(local_cloud, tabular)
    assert summary["item"] == "flowers.csv" and summary["rows"] == "9"
    scored = list(csv.DictReader(io.StringIO(read(local_cloud, f"jobs/{tabular}/outputs/flowers.scored.csv").decode())))
    assert [row["species"] for row in scored] == ["setosa"] * 3 + ["versicolor"] * 3 + ["virginica"] * 3
    assert "prob_setosa" not in scored[0]  # param-probabilities=false reached the handler, typed

    assert [row["item"] for row in rows(local_cloud, edges)] == ["scans/digit-0.png", "scans/digit-7.png"]
    assert manifests[edges]["items"] == manifests[edges]["items_succeeded"] == 2
    edge_map = read(local_cloud, f"jobs/{edges}/outputs/digit-0.edges.npy")
    assert edge_map.startswith(b"\x93NUMPY")

    assert [row["label"] for row in rows(local_cloud, digits)] == ["3"]
    for job in manifests:  # the stop function reads each manifest and ends the job in the table
        local_cloud.wait_until(lambda job=job: (local_cloud.job(job) or {}).get("status") == "SUCCEEDED", 60,
                               f"job {job} SUCCEEDED")
