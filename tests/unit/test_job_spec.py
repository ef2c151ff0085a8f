"""worker.spec: the job spec and launch requests, and the errors a bad one gets."""

from __future__ import annotations

import json

import pytest

from worker.errors import SpecError
from worker.spec import parse_launch_request, parse_spec

VALID_SPEC = {
    "job_id": "j-0123456789abcdef",
    "input": {"bucket": "in-bucket", "key": "any key/../; rm -rf ~", "version_id": None},
    "output": {"bucket": "out-bucket", "prefix": "jobs/j-0123456789abcdef/"},
    "package": {"name": "digits", "version": "cd" * 32, "uri": "s3://art-bucket/job-packages/digits/x.tar.gz"},
    "instance_id": "i-0abc",
}


def test_valid_spec_round_trips():
    spec = parse_spec(json.dumps(VALID_SPEC))
    assert spec.input_key == VALID_SPEC["input"]["key"]
    assert spec.output_key("manifest.json") == "jobs/j-0123456789abcdef/manifest.json"
    assert spec.package.name == "digits"
    # the optional fields come out with the values the job uses when they are absent
    defaults = {
        "lease": None, "max_concurrent_jobs": 4, "idle_shutdown_seconds": 600, "server_linger_seconds": 60,
        "max_runtime_seconds": None, "params": {},
    }
    assert spec.to_json() == {**VALID_SPEC, **defaults}
    assert parse_spec(json.dumps(spec.to_json())) == spec


def test_optional_fields_round_trip():
    full = {
        **VALID_SPEC,
        "lease": {"table": "bw-jobs", "seconds": 90},
        "max_concurrent_jobs": 2,
        "idle_shutdown_seconds": 30.5,
        "server_linger_seconds": 0,
        "max_runtime_seconds": 3600,
        "package": {"name": "wordstats", "version": "ab" * 32, "uri": "s3://art-bucket/job-packages/w.tar.gz"},
        "params": {"top": 3, "mode": "fast", "ratio": 0.5, "strict": True},
    }
    spec = parse_spec(json.dumps(full))
    assert (spec.lease.table, spec.lease.seconds) == ("bw-jobs", 90.0)
    assert (spec.max_concurrent_jobs, spec.idle_shutdown_seconds) == (2, 30.5)
    assert spec.server_linger_seconds == 0 and spec.max_runtime_seconds == 3600.0
    assert spec.to_json() == full


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"job_id": "j-../../etc"}, "job_id must match"),
        ({"job_id": "j-0123456789ABCDEF"}, "job_id must match"),
        ({"input": {"bucket": "in-bucket", "key": ""}}, "input.key must be"),
        ({"input": {"bucket": "in-bucket", "key": "k" * 1025}}, "longer than 1024"),
        ({"input": {"bucket": "Bad_Bucket", "key": "k"}}, "input.bucket must be"),
        ({"output": {"bucket": "out-bucket"}}, "output.prefix must be"),
        ({"package": None}, "package must be"),
        ({"package": {"name": "digits", "version": "cd" * 32, "uri": "https://example.com/m.tar.gz"}},
         "package.uri must look like"),
        ({"instance_id": "i-1; reboot"}, "instance_id must be"),
        ({"lease": {"table": "bw-jobs"}}, "lease must be null or"),
        ({"lease": {"table": "no/slash", "seconds": 90}}, "lease.table must be"),
        ({"lease": {"table": "bw-jobs", "seconds": 0}}, "lease.seconds must be"),
        ({"lease": {"table": "bw-jobs", "seconds": True}}, "lease.seconds must be"),
        ({"max_concurrent_jobs": 0}, "max_concurrent_jobs must be"),
        ({"max_concurrent_jobs": 2.5}, "max_concurrent_jobs must be"),
        ({"idle_shutdown_seconds": float("inf")}, "idle_shutdown_seconds must be"),
        ({"idle_shutdown_seconds": "600"}, "idle_shutdown_seconds must be"),
        ({"server_linger_seconds": -1}, "server_linger_seconds must be"),
        ({"server_linger_seconds": True}, "server_linger_seconds must be"),
        ({"server_linger_seconds": float("nan")}, "server_linger_seconds must be"),
        ({"max_runtime_seconds": 0}, "max_runtime_seconds must be"),
        ({"max_runtime_seconds": "60"}, "max_runtime_seconds must be"),
    ],
)
def test_invalid_spec_is_rejected(change, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(json.dumps({**VALID_SPEC, **change}))


def test_oversized_or_non_json_spec_is_rejected():
    with pytest.raises(SpecError, match="larger than 65536 bytes"):
        parse_spec(b" " * (64 * 1024 + 1))
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_spec(b"{nope")


def spec_with_id(n: int) -> dict:
    job = f"j-{n:016x}"
    return {**VALID_SPEC, "job_id": job, "output": {"bucket": "out-bucket", "prefix": f"jobs/{job}/"}}


def test_launch_request_is_one_spec_or_a_batch():
    specs, is_batch = parse_launch_request(json.dumps(VALID_SPEC).encode())
    assert not is_batch and [s.job_id for s in specs] == [VALID_SPEC["job_id"]]
    batch = {"jobs": [spec_with_id(n) for n in range(1, 4)]}
    specs, is_batch = parse_launch_request(json.dumps(batch).encode())
    assert is_batch and [s.job_id for s in specs] == [f"j-{n:016x}" for n in range(1, 4)]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"jobs": []}, "with 1 to 256 job specs"),
        ({"jobs": [VALID_SPEC] * 257}, "with 1 to 256 job specs"),
        ({"jobs": [VALID_SPEC], "extra": 1}, "a batch must be"),
        ({"jobs": VALID_SPEC}, "a batch must be"),
        (
            {"jobs": [spec_with_id(1), {**spec_with_id(2), "package": None}]},
            r"jobs\[1\] \(job_id 'j-0000000000000002'\): package must be .*nothing was started",
        ),
        ({"jobs": [spec_with_id(1), spec_with_id(1)]}, r"jobs\[1\].*appears twice"),
        ({"jobs": ["j-0000000000000001"]}, r"jobs\[0\] \(job_id None\): job spec must be a JSON object"),
    ],
)
def test_invalid_batch_is_rejected_whole(request_, message):
    with pytest.raises(SpecError, match=message):
        parse_launch_request(json.dumps(request_).encode())


def test_launch_request_size_limits():
    padded = json.dumps({**VALID_SPEC, "pad": " " * 70_000}).encode()
    with pytest.raises(SpecError, match="larger than 65536 bytes; send a batch"):
        parse_launch_request(padded)
    with pytest.raises(SpecError, match="larger than 1048576 bytes"):
        parse_launch_request(b" " * (1024 * 1024 + 1))
