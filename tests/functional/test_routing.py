"""The trigger routes uploads to job packages and refuses bad ones before any instance starts (in-process moto)."""

import json
from urllib.parse import quote_plus

import boto3
import pytest

from batchworker.config import Settings
from batchworker.control import job_spec
from batchworker.jobs import JobStore
from batchworker.models import job_id_for
from batchworker.routing import param_metadata
from tests.functional.conftest import ARTIFACTS, deploy_package
from tests.functional.handler_support import (
    LambdaContext,
    RecordingLambdaClient,
    load_handler,
    s3_event,
    sqs_event,
)

WORDSTATS = """name = "wordstats"
entrypoint = "handler:Job"
accept = [".txt", ".zip"]
[params.top]
type = "int"
default = 10
min = 1
max = 1000
"""
DIGITS = 'name = "digits"\nentrypoint = "handler:Job"\naccept = [".png", ".npy"]\n'


@pytest.fixture
def packages(stack, monkeypatch):
    """The stack with default_job = digits (not deployed until a test deploys it)."""
    monkeypatch.setenv("BATCHWORKER_DEFAULT_JOB", "digits")
    stack.env["BATCHWORKER_DEFAULT_JOB"] = "digits"
    return lambda toml: deploy_package(boto3.client("s3"), toml)


def upload(stack, trigger, key: str, **metadata) -> str:
    """Put a real object (with user metadata) and hand the trigger its event, as S3 -> SQS would."""
    s3 = boto3.client("s3")
    version = s3.put_object(Bucket=stack.input_bucket, Key=key, Body=b"data", Metadata=metadata)["VersionId"]
    # Like moto's own events: no versionId, so the trigger's HeadObject finds it (and the metadata).
    trigger.handler(sqs_event(s3_event(stack.input_bucket, quote_plus(key))), LambdaContext())
    return job_id_for(stack.input_bucket, key, version)


def manifest(stack, job_id):
    body = boto3.client("s3").get_object(Bucket=stack.output_bucket, Key=f"jobs/{job_id}/manifest.json")["Body"]
    return json.loads(body.read())


def assert_refused(stack, recorder, job_id, *words):
    item = stack.job_item(job_id)
    assert item["status"]["S"] == "FAILED"
    error = manifest(stack, job_id)["error"]
    for word in words:
        assert word in error, error
    assert recorder.calls == [], "no worker invocation for a refused upload"
    assert stack.instance_state() == "stopped", "no instance starts for a refused upload"
    return error


def test_prefix_routes_to_the_package_with_typed_params(stack, packages):
    ref = packages(WORDSTATS)
    packages(DIGITS)
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    job_id = upload(stack, trigger, "wordstats/book one.txt", **{"param-top": "3"})
    job = JobStore(stack.jobs_table).get(job_id)
    assert job.status.value == "QUEUED" and job.instance_id == stack.instance_id
    assert job.package == ref.to_spec() and job.params == {"top": 3}
    assert len(recorder.calls) == 1
    spec = job_spec(job, Settings.from_env(stack.env), stack.instance_id)
    assert spec["package"] == {"name": "wordstats", "version": ref.version, "uri": ref.uri}
    assert spec["params"] == {"top": 3}
    # AND the job started the instance: its ledger item names the package for the boot-time pre-warm
    ledger = stack.client("dynamodb").get_item(
        TableName=stack.events_table, Key={"instance_id": {"S": stack.instance_id}, "at": {"S": "~ledger"}},
        ProjectionExpression="prewarm")["Item"]
    assert ledger == {"prewarm": {"M": {"wordstats": {"S": ref.version}}}}


def test_non_ascii_parameter_values_arrive_as_written(stack, packages):
    """HTTP headers are ASCII: `submit --param` sends other text as an RFC 2047 word (as S3 also returns it),
    and the trigger decodes it before validating."""
    ref = packages('name = "captions"\nentrypoint = "handler:Job"\naccept = [".txt"]\n'
                   '[params.title]\ntype = "str"\ndefault = ""\n')
    trigger = load_handler("trigger")
    trigger.lambda_client = RecordingLambdaClient()
    title = "Grüße, 日本 =?not-a-word?="
    metadata = param_metadata({"title": title})
    assert metadata["param-title"].isascii()
    job_id = upload(stack, trigger, "captions/a.txt", **metadata)
    job = JobStore(stack.jobs_table).get(job_id)
    assert job.package == ref.to_spec() and job.params == {"title": title}


def test_other_keys_run_the_default_job(stack, packages):
    packages(WORDSTATS)
    digits = packages(DIGITS)
    trigger = load_handler("trigger")
    trigger.lambda_client = RecordingLambdaClient()
    for key in ("a.png", "photos/b.png", "Not A Job/c.npy"):
        job = JobStore(stack.jobs_table).get(upload(stack, trigger, key))
        assert job.package["name"] == "digits" and job.package["version"] == digits.version, key
        assert job.params == {}


def test_bad_parameter_fails_before_any_instance_starts(stack, packages):
    packages(WORDSTATS)
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    job_id = upload(stack, trigger, "wordstats/a.txt", **{"param-top": "0"})
    assert_refused(stack, recorder, job_id, "'top'", "minimum 1", "param-")
    job_id = upload(stack, trigger, "wordstats/b.txt", **{"param-topp": "3"})
    assert_refused(stack, recorder, job_id, "'topp'", "did you mean 'top'")


def test_extension_not_accepted_fails_before_any_instance_starts(stack, packages):
    packages(WORDSTATS)
    packages(DIGITS)
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    job_id = upload(stack, trigger, "wordstats/table.csv")
    assert_refused(stack, recorder, job_id, "'wordstats'", ".csv", ".txt, .zip")


def test_mistyped_job_name_falls_to_the_default_job_and_says_so(stack, packages):
    packages(WORDSTATS)
    packages(DIGITS)
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    job_id = upload(stack, trigger, "wordstat/a.txt")
    error = assert_refused(stack, recorder, job_id, "'digits'", ".txt", "no job package 'wordstat'",
                           "did you mean 'wordstats/'")
    assert "default job" in error


def test_default_job_not_deployed(stack, packages):
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    job_id = upload(stack, trigger, "a.png")
    assert_refused(stack, recorder, job_id, "default job 'digits' is not deployed", "job deploy")


def test_each_job_is_pinned_to_the_version_current_when_accepted(stack, packages):
    # GIVEN a job of wordstats v1 accepted (queued, not yet dispatched)
    v1 = packages(WORDSTATS)
    trigger = load_handler("trigger")
    trigger.lambda_client = RecordingLambdaClient()
    first = upload(stack, trigger, "wordstats/1.txt")
    # WHEN v2 is deployed and another upload arrives
    v2 = packages(WORDSTATS.replace("default = 10", "default = 20"))
    second = upload(stack, trigger, "wordstats/2.txt")
    # THEN the first job still names v1 (and its v1 default), the second v2
    store, settings = JobStore(stack.jobs_table), Settings.from_env(stack.env)
    assert v1.version != v2.version
    spec1 = job_spec(store.get(first), settings, stack.instance_id)
    spec2 = job_spec(store.get(second), settings, stack.instance_id)
    assert (spec1["package"]["version"], spec1["params"]) == (v1.version, {"top": 10})
    assert (spec2["package"]["version"], spec2["params"]) == (v2.version, {"top": 20})
    # AND both archives stay fetchable
    s3 = boto3.client("s3")
    for ref in (v1, v2):
        s3.head_object(Bucket=ARTIFACTS, Key=ref.uri.split("/", 3)[3])


def test_one_batch_reads_each_package_pointer_once(stack, packages, monkeypatch):
    packages(WORDSTATS)
    packages(DIGITS)
    trigger = load_handler("trigger")
    trigger.lambda_client = RecordingLambdaClient()
    reads = []
    real = trigger.registry.current
    monkeypatch.setattr(trigger.registry, "current", lambda name: reads.append(name) or real(name))
    s3 = boto3.client("s3")
    keys = [f"wordstats/{n}.txt" for n in range(5)] + ["x.png", "y.png"]
    for key in keys:
        s3.put_object(Bucket=stack.input_bucket, Key=key, Body=b"d")
    trigger.handler(sqs_event(*(s3_event(stack.input_bucket, quote_plus(k)) for k in keys)), LambdaContext())
    assert sorted(reads) == ["digits", "wordstats"]


def test_without_default_job_other_keys_are_refused(stack, packages, monkeypatch):
    # GIVEN no default_job
    monkeypatch.setenv("BATCHWORKER_DEFAULT_JOB", "")
    stack.env["BATCHWORKER_DEFAULT_JOB"] = ""
    ref = packages(WORDSTATS)
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    store = JobStore(stack.jobs_table)
    # THEN <name>/ still runs the package, and every other key fails at once, saying where to upload
    job = store.get(upload(stack, trigger, "wordstats/a.txt"))
    assert job.package == ref.to_spec()
    assert job_spec(job, Settings.from_env(stack.env), stack.instance_id)["package"] == ref.to_spec()
    for key in ("a.png", "photos/b.png", "wordstat/c.png"):
        job_id = upload(stack, trigger, key)
        assert store.get(job_id).status.value == "FAILED", key
        assert "no default job" in manifest(stack, job_id)["error"], key
    assert "did you mean 'wordstats/'" in manifest(stack, upload(stack, trigger, "wordstat/d.png"))["error"]
    assert len(recorder.calls) == 1
