"""The SSM transport's pure parts: JobSpec payload, retry classification, launcher reply, settings."""

import base64
import dataclasses
import re

import pytest
from botocore.exceptions import ClientError

from batchworker.config import Settings
from batchworker.errors import ConfigurationError, DispatchError
from batchworker.transports.ssm import (
    JOB_SPEC_PATTERN,
    MAX_JOB_SPEC_CHARS,
    SsmLauncher,
    decode_job_spec,
    encode_job_spec,
    execution_timeout,
    is_retryable,
    is_valid_job_spec,
    parse_launch_reply,
)
from tests.unit.test_models_config import REQUIRED

HOSTILE_KEYS = [
    "plain.png",
    "in box/$(rm -rf ~) ;x.png",
    "`id`|&&||;>out<in",
    "quotes \"double\" 'single' \\backslash",
    "line1\nline2\r\n\ttab",
    "ünïcödé/雪/🚀.png",
    "{{ JobSpec }} {{ssm:/secret}} %s %n ${HOME}",
    "\x00\x1f\x7f",
]


def spec(key: str) -> dict:
    return {
        "job_id": "j-0123456789abcdef",
        "input": {"bucket": "in", "key": key, "version_id": None},
        "output": {"bucket": "out", "prefix": "jobs/j-0123456789abcdef/"},
        "package": {"name": "digits", "version": "cd" * 32, "uri": "s3://a/job-packages/d.tar.gz"},
        "instance_id": "i-0123456789abcdef0",
    }


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_round_trip_inside_base64_that_matches_the_document_pattern(key):
    encoded = encode_job_spec(spec(key))
    assert re.fullmatch(JOB_SPEC_PATTERN, encoded)
    assert is_valid_job_spec(encoded)
    assert decode_job_spec(encoded) == spec(key)
    # The decoded text is ASCII, whatever the instance's locale makes of stdin.
    base64.b64decode(encoded).decode("ascii")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "YWJj\n",
        "YWJj ",
        "YW$(x)Jj",
        "YWJj===",
        "YW-_Jj",
        "'YWJj'",
        "YWJj;id",
        "A" * 12001,
    ],
)
def test_pattern_refuses_anything_but_plain_base64(value):
    assert not is_valid_job_spec(value)


def test_pattern_bounds():
    assert is_valid_job_spec("A" * 12000 + "==")
    assert not is_valid_job_spec("A" * 12000 + "===")
    assert is_valid_job_spec("AAAA")


def test_spec_that_does_not_fit_is_refused_with_a_clear_message():
    # the largest key that fits, then one that does not
    fits = encode_job_spec(spec("k" * 8500))
    assert len(fits) <= MAX_JOB_SPEC_CHARS
    with pytest.raises(
        DispatchError, match=r"more than the 12002 the SSM document accepts: shorten the object key"
    ):
        encode_job_spec(spec("k" * 9300))


def test_execution_timeout_is_whole_seconds_at_least_one():
    settings = Settings.from_env({**REQUIRED, "BATCHWORKER_MAX_JOB_RUNTIME_SECONDS": "14400"})
    assert execution_timeout(settings) == "14400"
    assert execution_timeout(dataclasses.replace(settings, max_job_runtime_seconds=0.2)) == "1"
    assert execution_timeout(dataclasses.replace(settings, max_job_runtime_seconds=90.5)) == "91"


def _error(code, status=400):
    return ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "SendCommand"
    )


@pytest.mark.parametrize(
    "code,status,expected",
    [
        ("ThrottlingException", 400, True),
        ("TooManyRequestsException", 429, True),
        ("RequestLimitExceeded", 400, True),
        ("InternalServerError", 500, True),
        ("SomethingNew", 503, True),
        ("InvalidInstanceId", 400, False),  # retried only by send(), where it means "not registered yet"
        ("InvalidDocument", 400, False),
        ("AccessDeniedException", 400, False),
    ],
)
def test_only_throttling_and_server_errors_are_retryable(code, status, expected):
    assert is_retryable(_error(code, status)) is expected


@pytest.mark.parametrize(
    "stdout,expected",
    [
        ('{"job_id": "j-1", "pid": 7}\n', {"job_id": "j-1", "pid": 7}),
        ('warming up\n{"job_id": "j-1", "pid": 7}\n\n', {"job_id": "j-1", "pid": 7}),
        ('{"old": 1}\nnoise\n{"job_id": "j-2", "pid": 8}', {"job_id": "j-2", "pid": 8}),
        ("[1, 2]\n", {}),
        ("", {}),
    ],
)
def test_launch_reply_is_the_last_json_object_line(stdout, expected):
    assert parse_launch_reply(stdout) == expected


def test_transport_defaults_to_ssm_and_is_checked():
    assert Settings.from_env(REQUIRED).transport == "ssm"
    assert Settings.from_env({**REQUIRED, "BATCHWORKER_TRANSPORT": "ssh"}).transport == "ssh"
    with pytest.raises(ConfigurationError, match="BATCHWORKER_TRANSPORT"):
        Settings.from_env({**REQUIRED, "BATCHWORKER_TRANSPORT": "telnet"})


def test_new_settings_are_read():
    settings = Settings.from_env(
        {
            **REQUIRED,
            "BATCHWORKER_SSM_DOCUMENT": "bw-run-job",
            "BATCHWORKER_SSM_OUTPUT_BUCKET": "out",
            "BATCHWORKER_SSM_OUTPUT_PREFIX": "ssm/",
            "BATCHWORKER_MAX_JOB_RUNTIME_SECONDS": "7200",
        }
    )
    assert (settings.ssm_document, settings.ssm_output_bucket, settings.ssm_output_prefix) == (
        "bw-run-job",
        "out",
        "ssm/",
    )
    assert settings.max_job_runtime_seconds == 7200.0
    defaults = Settings.from_env(REQUIRED)
    assert (defaults.ssm_document, defaults.ssm_output_bucket) == (None, None)
    assert (defaults.ssm_output_prefix, defaults.max_job_runtime_seconds) == ("ssm-output/", 3600.0)


@pytest.mark.parametrize("runtime", ["0", "172801"])
def test_max_job_runtime_must_fit_ssm(runtime):
    with pytest.raises(ConfigurationError, match="BATCHWORKER_MAX_JOB_RUNTIME_SECONDS"):
        Settings.from_env({**REQUIRED, "BATCHWORKER_MAX_JOB_RUNTIME_SECONDS": runtime})


def test_long_runtimes_are_fine_over_ssh():
    env = {**REQUIRED, "BATCHWORKER_TRANSPORT": "ssh", "BATCHWORKER_MAX_JOB_RUNTIME_SECONDS": "259200"}
    assert Settings.from_env(env).max_job_runtime_seconds == 259200.0


def test_ssm_launcher_needs_the_document_and_names_the_variable():
    with pytest.raises(ConfigurationError, match="BATCHWORKER_SSM_DOCUMENT"):
        SsmLauncher(Settings.from_env(REQUIRED), ssm_client=None)
