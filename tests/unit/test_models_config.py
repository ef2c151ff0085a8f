"""Job identity and settings."""

import pytest

from batchworker.config import Settings
from batchworker.errors import ConfigurationError
from batchworker.manifests import JOB_ID_PATTERN
from batchworker.models import job_id_for

REQUIRED = {
    "BATCHWORKER_INPUT_BUCKET": "in",
    "BATCHWORKER_OUTPUT_BUCKET": "out",
    "BATCHWORKER_JOBS_TABLE": "jobs",
    "BATCHWORKER_INSTANCE_EVENTS_TABLE": "events",
    "BATCHWORKER_POOL_TAG": "bw",
    "BATCHWORKER_WORKER_FUNCTION": "bw-worker",
    "BATCHWORKER_PARAMETER_PREFIX": "/bw",
    "BATCHWORKER_JOB_COMMAND": "/opt/x launch",
    "BATCHWORKER_ARTIFACTS_BUCKET": "art",
}


def test_job_id_is_stable_per_object_version_and_path_safe():
    a = job_id_for("in", "a b/$(x).png", "v1")
    assert a == job_id_for("in", "a b/$(x).png", "v1")
    assert a != job_id_for("in", "a b/$(x).png", "v2")
    assert a != job_id_for("other", "a b/$(x).png", "v1")
    assert job_id_for("in", "k", '"etag"') == job_id_for("in", "k", "etag")
    assert JOB_ID_PATTERN.match(a)


def test_settings_read_every_field_and_convert_numbers():
    settings = Settings.from_env({**REQUIRED, "BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS": "42"})
    assert settings.input_bucket == "in"
    assert settings.instance_ready_timeout_seconds == 42.0
    assert settings.ssh_private_key_parameter == "/bw/ssh/private-key"


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_missing_setting_is_named(missing):
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(ConfigurationError, match=missing):
        Settings.from_env(env)


def test_bad_number_is_named():
    with pytest.raises(ConfigurationError, match="READY_TIMEOUT"):
        Settings.from_env({**REQUIRED, "BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS": "soon"})


def test_idle_grace_policy_defaults_to_adaptive_and_rejects_unknown_values():
    assert Settings.from_env(REQUIRED).idle_grace_policy == "adaptive"
    assert Settings.from_env({**REQUIRED, "BATCHWORKER_IDLE_GRACE_POLICY": "fixed"}).idle_grace_policy == "fixed"
    with pytest.raises(ConfigurationError, match="IDLE_GRACE_POLICY must be one of adaptive, fixed"):
        Settings.from_env({**REQUIRED, "BATCHWORKER_IDLE_GRACE_POLICY": "sometimes"})


def test_default_job_needs_a_valid_name():
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({**REQUIRED, "BATCHWORKER_DEFAULT_JOB": "Digits"})
    assert "DEFAULT_JOB" in str(raised.value) and "'Digits'" in str(raised.value)


def test_default_job_is_optional():
    settings = Settings.from_env({**REQUIRED, "BATCHWORKER_DEFAULT_JOB": ""})
    assert settings.default_job is None and settings.artifacts_bucket == "art"


@pytest.mark.parametrize("value", [None, ""])
def test_a_deployment_without_an_artifacts_bucket_is_refused(value):
    """Every job runs a job package from the artifacts bucket: without one nothing could run, so the functions
    refuse to load rather than accept uploads the instance would refuse."""
    env = {k: v for k, v in REQUIRED.items() if k != "BATCHWORKER_ARTIFACTS_BUCKET"}
    if value is not None:
        env["BATCHWORKER_ARTIFACTS_BUCKET"] = value
    with pytest.raises(ConfigurationError, match="BATCHWORKER_ARTIFACTS_BUCKET is not set"):
        Settings.from_env({**env, "BATCHWORKER_DEFAULT_JOB": "digits"})
    with pytest.raises(ConfigurationError, match="BATCHWORKER_ARTIFACTS_BUCKET is not set"):
        Settings.from_env(env)
