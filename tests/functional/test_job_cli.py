"""`batchworker job deploy | list | rollback` and `submit --job --param` against in-process moto."""

import json

import boto3
import pytest
from moto import mock_aws

from batchworker.cli.main import main

ENV = {
    "BATCHWORKER_INPUT_BUCKET": "cli-input",
    "BATCHWORKER_OUTPUT_BUCKET": "cli-output",
    "BATCHWORKER_JOBS_TABLE": "cli-jobs",
    "BATCHWORKER_INSTANCE_EVENTS_TABLE": "cli-events",
    "BATCHWORKER_POOL_TAG": "cli",
    "BATCHWORKER_ARTIFACTS_BUCKET": "cli-artifacts",
}
TOML = 'name = "wordstats"\nentrypoint = "handler:Job"\naccept = [".txt"]\n[params.top]\ntype = "int"\ndefault = 10\nmin = 1\n'


@pytest.fixture
def s3(monkeypatch):
    for name, value in {**ENV, "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        for bucket in ("cli-input", "cli-artifacts"):
            client.create_bucket(Bucket=bucket)
        client.put_bucket_versioning(Bucket="cli-input", VersioningConfiguration={"Status": "Enabled"})
        yield client


def package(tmp_path, toml=TOML, body="class Job: ...\n"):
    folder = tmp_path / "wordstats"
    folder.mkdir(exist_ok=True)
    (folder / "job.toml").write_text(toml)
    (folder / "handler.py").write_text(body)
    return folder


def said(capsys) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def objects(s3, bucket):
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_invalid_job_toml_is_refused_and_nothing_is_uploaded(s3, tmp_path, capsys):
    folder = package(tmp_path, toml=TOML.replace('accept = [".txt"]', 'accept = "txt"'))
    assert main(["job", "deploy", str(folder)]) == 1
    assert "accept" in said(capsys)
    assert objects(s3, "cli-artifacts") == []


def test_deploy_list_rollback(s3, tmp_path, capsys):
    folder = package(tmp_path)
    assert main(["job", "deploy", str(folder)]) == 0
    assert "deployed wordstats version" in capsys.readouterr().out
    assert main(["job", "deploy", str(folder)]) == 0
    assert "already current" in capsys.readouterr().out
    package(tmp_path, body="class Job: pass\n")
    assert main(["job", "deploy", str(folder)]) == 0
    capsys.readouterr()
    assert main(["job", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["name"] == "wordstats" and listed["source"] == "deploy" and listed["deployed_at"]
    second = listed["version"]
    assert main(["job", "rollback", "wordstats"]) == 0
    assert "current again" in capsys.readouterr().out
    assert main(["job", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["version"] != second and listed["source"] == "rollback"
    assert main(["job", "rollback", "wordstats"]) == 1
    assert "nothing to roll back" in said(capsys)


def test_submit_with_job_and_params(s3, tmp_path, capsys):
    assert main(["job", "deploy", str(package(tmp_path))]) == 0
    data = tmp_path / "book.txt"
    data.write_text("a b c")
    # A bad parameter or an unaccepted file is refused before anything is uploaded.
    assert main(["submit", "--job", "wordstats", "--param", "top=0", str(data)]) == 1
    assert "minimum" in said(capsys)
    other = tmp_path / "table.csv"
    other.write_text("1,2")
    assert main(["submit", "--job", "wordstats", str(other)]) == 1
    assert "does not accept table.csv" in said(capsys)
    assert main(["submit", "--job", "wordstat", str(data)]) == 1
    assert "no job package 'wordstat'" in said(capsys)
    assert objects(s3, "cli-input") == []
    # A good one lands under wordstats/ with its parameter as S3 user metadata.
    assert main(["submit", "--job", "wordstats", "--param", "top=3", str(data)]) == 0
    head = s3.head_object(Bucket="cli-input", Key="wordstats/book.txt")
    assert head["Metadata"] == {"param-top": "3"}
