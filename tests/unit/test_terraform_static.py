"""Static checks of terraform/ (parsed with python-hcl2), its user data and SSM document, and of the
reproducible builds (scripts/build_lambdas.py, scripts/build_job_package.py).

moto enforces no IAM and ignores conditions, so the tag-scoped policies are checked here, from the HCL;
rules across variables (Terraform 1.0 cannot express them) are checked here too.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import hcl2
import pytest

from batchworker.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO_ROOT / "terraform"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_lambdas.py"
JOB_PACKAGE_SCRIPT = REPO_ROOT / "scripts" / "build_job_package.py"
USER_DATA_TEMPLATE = TERRAFORM_DIR / "templates" / "user_data.sh.tftpl"
POOL_CONDITION_KEY = "ec2:ResourceTag/batchworker:pool"
SSM_POOL_CONDITION_KEY = "ssm:resourceTag/batchworker:pool"
JOB_SPEC_PATTERN = "^[A-Za-z0-9+/]{4,12000}={0,2}$"


def _unquote(value: str) -> str:
    # python-hcl2 >= 5 keeps the quotes of string literals and block labels; 4.x strips them.
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _normalize(node: Any) -> Any:
    if isinstance(node, dict):
        return {_unquote(key): _normalize(value) for key, value in node.items() if key != "__is_block__"}
    if isinstance(node, list):
        return [_normalize(item) for item in node]
    if isinstance(node, str):
        return _unquote(node)
    return node


def _load_terraform() -> dict[str, Any]:
    """All .tf files merged: {"resource": {type: {name: body}}, "data": ..., "variable": ..., ...}."""
    merged: dict[str, Any] = {
        "resource": {},
        "data": {},
        "variable": {},
        "output": {},
        "locals": {},
        "blocks": set(),
    }
    for path in sorted(TERRAFORM_DIR.glob("*.tf")):
        with path.open() as handle:
            parsed = _normalize(hcl2.load(handle))
        merged["blocks"].update(parsed)
        for kind in ("resource", "data"):
            for entry in parsed.get(kind, []):
                for type_name, named in entry.items():
                    for name, body in named.items():
                        merged[kind].setdefault(type_name, {})[name] = body
        for kind in ("variable", "output"):
            for entry in parsed.get(kind, []):
                merged[kind].update(entry)
        for entry in parsed.get("locals", []):
            merged["locals"].update(entry)
    return merged


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    return _load_terraform()


def _raw_terraform_text() -> str:
    return "\n".join(path.read_text() for path in sorted(TERRAFORM_DIR.glob("*.tf")))


def _blocks(body: dict, name: str) -> list[dict]:
    """Nested blocks `name` of a body, including the content of `dynamic "name"` blocks."""
    found = list(body.get(name, []))
    for dynamic in body.get("dynamic", []):
        if name in dynamic:
            found.extend(dynamic[name].get("content", []))
    return found


def _policy_statements(tf: dict) -> dict[str, list[dict]]:
    return {name: _blocks(body, "statement") for name, body in tf["data"]["aws_iam_policy_document"].items()}


def _actions(statement: dict) -> list[str]:
    actions = statement.get("actions", [])
    return actions if isinstance(actions, list) else [actions]


# --- buckets and events ------------------------------------------------------------------------


def test_input_and_output_buckets_are_distinct(tf):
    # GIVEN the bucket resource, one instance per role
    bucket = tf["resource"]["aws_s3_bucket"]["this"]
    roles = re.findall(r'"(\w+)"', bucket["for_each"])
    # THEN input and output are different instances whose names carry the role
    assert {"input", "output", "artifacts"} <= set(roles)
    assert len(roles) == len(set(roles))
    assert bucket["bucket"] == "${local.bucket_names[each.key]}"
    names = str(tf["locals"]["bucket_names"])
    assert "${var.name_prefix}-${key}-${local.account_id}${local.global_name_suffix}" in names
    # AND the outputs and notifications point at different instances
    assert tf["output"]["input_bucket"]["value"] != tf["output"]["output_bucket"]["value"]
    notifications = tf["resource"]["aws_s3_bucket_notification"]
    assert 'aws_s3_bucket.this["input"]' in notifications["input"]["bucket"]
    assert 'aws_s3_bucket.this["output"]' in notifications["output"]["bucket"]


def test_done_queue_notification_filters_on_manifest(tf):
    queues = [
        queue
        for notification in tf["resource"]["aws_s3_bucket_notification"].values()
        for queue in _blocks(notification, "queue")
    ]
    done = [queue for queue in queues if "aws_sqs_queue.done.arn" in queue["queue_arn"]]
    assert len(done) == 1
    assert done[0]["filter_suffix"] == "manifest.json"
    assert done[0]["events"] == ["s3:ObjectCreated:*"]


def test_notifications_wait_for_queue_policies(tf):
    for name, notification in tf["resource"]["aws_s3_bucket_notification"].items():
        queue_names = {
            re.search(r"aws_sqs_queue\.(\w+)\.arn", q["queue_arn"]).group(1) for q in notification["queue"]
        }
        depends_on = " ".join(notification.get("depends_on", []))
        for queue_name in queue_names:
            assert f"aws_sqs_queue_policy.{queue_name}" in depends_on, name


def test_queue_policies_scope_s3_by_source_arn_and_account(tf):
    for name in ("jobs_queue", "done_queue"):
        for statement in _policy_statements(tf)[name]:
            variables = {condition["variable"] for condition in statement["condition"]}
            assert {"aws:SourceArn", "aws:SourceAccount"} <= variables, name


# --- IAM -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["ec2:StartInstances", "ec2:StopInstances"])
def test_start_and_stop_are_scoped_to_the_pool_tag(tf, action):
    statements = [
        (document, statement)
        for document, statements in _policy_statements(tf).items()
        for statement in statements
        if action in _actions(statement) or "ec2:*" in _actions(statement)
    ]
    assert statements, f"no policy grants {action}"
    for document, statement in statements:
        conditions = [c for c in statement.get("condition", []) if c["variable"] == POOL_CONDITION_KEY]
        assert conditions, f"{document}: {action} without a {POOL_CONDITION_KEY} condition"
        assert conditions[0]["test"] == "StringEquals"
        assert conditions[0]["values"] == ["${var.name_prefix}"]
        assert statement.get("resources") != ["*"], f"{document}: {action} on every resource"


def test_each_function_gets_only_its_ec2_state_changes(tf):
    statements = _policy_statements(tf)

    def grants(document: str, action: str) -> bool:
        return any(action in _actions(statement) for statement in statements[document])

    assert grants("trigger", "ec2:StartInstances") and not grants("trigger", "ec2:StopInstances")
    assert grants("worker", "ec2:StartInstances") and not grants("worker", "ec2:StopInstances")
    assert grants("stop", "ec2:StopInstances") and not grants("stop", "ec2:StartInstances")
    assert grants("reaper", "ec2:StopInstances") and not grants("reaper", "ec2:StartInstances")


def test_no_wildcard_allows(tf):
    for document, statements in _policy_statements(tf).items():
        for statement in statements:
            if statement.get("effect", "Allow") != "Allow":
                continue
            for action in _actions(statement):
                assert action != "*" and not action.endswith(":*"), f"{document}: {action}"


# --- network ---------------------------------------------------------------------------------------


def test_no_ingress_from_anywhere(tf):
    ingress_rules = [
        rule
        for group in tf["resource"].get("aws_security_group", {}).values()
        for rule in _blocks(group, "ingress")
    ]
    ingress_rules += [
        rule
        for rule in tf["resource"].get("aws_security_group_rule", {}).values()
        if rule.get("type") == "ingress"
    ]
    ingress_rules += list(tf["resource"].get("aws_vpc_security_group_ingress_rule", {}).values())
    for rule in ingress_rules:
        text = repr(rule)
        assert "0.0.0.0/0" not in text and "::/0" not in text, rule
    assert tf["variable"]["ssh_allowed_cidrs"]["default"] == []


def test_instances_carry_the_pool_tag_and_imdsv2(tf):
    instance = tf["resource"]["aws_instance"]["gpu"]
    assert instance["tags"]["batchworker:pool"] == "${var.name_prefix}"
    assert instance["metadata_options"][0]["http_tokens"] == "required"
    template = tf["resource"]["aws_launch_template"]["gpu"]
    assert template["metadata_options"][0]["http_tokens"] == "required"
    assert template["block_device_mappings"][0]["ebs"][0]["encrypted"] is True


# --- Lambda timing and settings ---------------------------------------------------------------------


def test_queue_visibility_is_six_times_the_consumer_timeout(tf):
    queues = tf["resource"]["aws_sqs_queue"]
    mappings = tf["resource"]["aws_lambda_event_source_mapping"]
    for mapping in mappings.values():
        queue = re.search(r"aws_sqs_queue\.(\w+)\.arn", mapping["event_source_arn"]).group(1)
        function = re.search(r'aws_lambda_function\.this\["(\w+)"\]', mapping["function_name"]).group(1)
        assert (
            queues[queue]["visibility_timeout_seconds"] == f"${{6 * local.lambda_timeout_seconds.{function}}}"
        )
        assert mapping["enabled"] == "${var.event_source_mappings_enabled}"
        assert mapping["function_response_types"] == ["ReportBatchItemFailures"]


def test_ready_timeout_fits_in_the_worker_timeout(tf):
    # Cross-variable rule kept out of the HCL (Terraform 1.0 cannot express it).
    worker_timeout = int(tf["locals"]["lambda_timeout_seconds"]["worker"])
    assert tf["variable"]["instance_ready_timeout_seconds"]["default"] < worker_timeout


def test_lambda_environment_matches_the_settings_contract(tf):
    environment = tf["locals"]["lambda_environment"]
    # Every Settings field is set by Terraform, except the knobs kept at their code defaults.
    code_only = {"dispatch_command_timeout_seconds", "max_input_bytes", "restart_cost_seconds"}
    expected = {f"BATCHWORKER_{f.name.upper()}" for f in dataclasses.fields(Settings) if f.name not in code_only}
    assert expected | {"POWERTOOLS_SERVICE_NAME"} == set(environment)
    assert environment["BATCHWORKER_TRANSPORT"] == "${var.transport}"
    assert environment["BATCHWORKER_IDLE_GRACE_SECONDS"] == "${tostring(var.idle_grace_seconds)}"
    assert environment["BATCHWORKER_MAX_JOB_RUNTIME_SECONDS"] == "${tostring(var.max_job_runtime_seconds)}"
    assert environment["BATCHWORKER_SSM_DOCUMENT"] == "${aws_ssm_document.run_job.name}"
    assert 'aws_s3_bucket.this["output"]' in environment["BATCHWORKER_SSM_OUTPUT_BUCKET"]


def test_lambda_environment_covers_every_required_setting(tf):
    import dataclasses

    from batchworker.config import ENV_PREFIX, Settings

    environment = set(tf["locals"]["lambda_environment"])
    required = {
        ENV_PREFIX + f.name.upper()
        for f in dataclasses.fields(Settings)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert required <= environment, required - environment


# --- Terraform 1.0 compatibility and house style ---------------------------------------------------


def test_hcl_stays_terraform_1_0_compatible(tf):
    text = _raw_terraform_text()
    assert "optional(" not in text
    assert not {"check", "import", "removed", "moved"} & tf["blocks"]
    for name, variable in tf["variable"].items():
        for validation in variable.get("validation", []):
            referenced = set(re.findall(r"var\.(\w+)", validation["condition"]))
            assert referenced <= {name}, f"variable {name}: validation references {referenced - {name}}"


def test_variables_and_outputs_are_documented(tf):
    for name, variable in tf["variable"].items():
        assert variable.get("description"), name
        assert variable.get("type"), name
    for name, output in tf["output"].items():
        assert output.get("description"), name


@pytest.mark.parametrize(
    "name",
    ["name_prefix", "instance_type", "instance_count", "idle_grace_seconds", "max_job_runtime_seconds",
     "transport", "ssh_allowed_cidrs", "ssh_public_key", "job_command"],
)  # fmt: skip
def test_costly_variables_are_validated(tf, name):
    assert tf["variable"][name].get("validation"), f"variable {name} has no validation block"


def test_defaults_are_safe(tf):
    variables = tf["variable"]
    assert variables["transport"]["default"] == "ssm"
    assert variables["ssh_allowed_cidrs"]["default"] == []
    assert variables["ssh_public_key"]["default"] is None
    assert variables["tls_only_bucket_policy"]["default"] is True
    assert variables["lambda_subnet_ids"]["default"] == []
    assert variables["ami_id"]["default"] is None  # -> the Deep Learning AMI lookup
    assert 'var.ami_id == null ? ["amazon"]' in _raw_terraform_text()
    assert variables["instance_type"]["default"].startswith("g4dn.")


SSH_MAX_INSTANCES = 20


def test_cross_variable_rules(tf):
    # Rules Terraform 1.0 cannot state in a validation block, checked on the defaults.
    variables = tf["variable"]
    timeouts = {name: int(value) for name, value in tf["locals"]["lambda_timeout_seconds"].items()}
    assert variables["instance_ready_timeout_seconds"]["default"] < timeouts["worker"]
    assert 0 < variables["max_job_runtime_seconds"]["default"] <= 172800  # SSM Run Command's limit
    assert variables["idle_grace_seconds"]["default"] >= 0
    # The job may outlive the worker function (it is launched detached), never the other way round.
    assert variables["max_job_runtime_seconds"]["default"] >= timeouts["worker"]
    # A message comes back from the DLQ only after max_receive_count deliveries.
    assert variables["max_receive_count"]["default"] >= 1
    # The ssh transport adds an IAM statement per instance: its pool stays at most 20 (ssm: 500).
    assert variables["transport"]["default"] == "ssm" or variables["instance_count"]["default"] <= SSH_MAX_INSTANCES
    assert "at most 20 with ssh" in variables["instance_count"]["description"]
    # Lambda refuses an SQS batch size over 10 without a batching window.
    assert variables["event_source_batch_size"]["default"] <= 10 or variables["trigger_batching_window_seconds"]["default"] >= 1


# --- every statement says who needs it ------------------------------------------------------------

_STATEMENT_OWNERS = re.compile(
    r"^\s*# (trigger|worker|stop|reaper|instance|client|operator|S3|Everyone|Lambda service|EC2 service)\b[^:]*: \S"
)


def test_every_iam_statement_names_the_function_that_needs_it():
    for path in sorted(TERRAFORM_DIR.glob("*.tf")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if not re.match(r"^\s*(statement|dynamic \"statement\") \{", line):
                continue
            # The comment lines right above the statement; the first one names who needs it.
            above = number
            while above > 0 and lines[above - 1].strip().startswith("#"):
                above -= 1
            assert above < number and _STATEMENT_OWNERS.match(lines[above]), (
                f"{path.name}:{number + 1}: statement without a '# <function>: why' comment right above it"
            )


def test_checkov_suppressions_give_a_reason():
    for path in sorted(TERRAFORM_DIR.glob("*.tf")):
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                assert re.match(r"^\s*#checkov:skip=CKV2?_AWS_\d+:\S.{15,}$", line), (
                    f"{path.name}: {line.strip()}"
                )


# --- SSM transport -----------------------------------------------------------------------------------


def _ssm_document(tf) -> dict:
    """The run-job document's content: the object literal inside jsonencode(...), parsed as HCL."""
    import hcl2

    content = tf["resource"]["aws_ssm_document"]["run_job"]["content"]
    assert content.startswith("${jsonencode(") and content.endswith(")}")
    return _normalize(hcl2.loads("document = " + content[len("${jsonencode(") : -2] + "\n"))["document"]


def test_ssm_document_takes_the_spec_as_a_pattern_checked_parameter(tf):
    resource = tf["resource"]["aws_ssm_document"]["run_job"]
    assert resource["document_type"] == "Command"
    assert resource["name"] == "${local.ssm_document_name}"
    assert tf["locals"]["ssm_document_name"] == "${var.name_prefix}-run-job"
    document = _ssm_document(tf)
    assert document["schemaVersion"] == "2.2"
    job_spec = document["parameters"]["JobSpec"]
    assert job_spec["type"] == "String"
    assert job_spec["allowedPattern"] == JOB_SPEC_PATTERN
    # The pattern admits only the base64 alphabet: no quote, space or shell metacharacter.
    assert set(re.findall(r"\[([^\]]+)\]", job_spec["allowedPattern"])) == {"A-Za-z0-9+/"}
    timeout = document["parameters"]["executionTimeout"]
    assert timeout["default"] == "${tostring(var.max_job_runtime_seconds)}"
    assert re.fullmatch(timeout["allowedPattern"], "172800") and re.fullmatch(timeout["allowedPattern"], "1")
    assert not re.fullmatch(timeout["allowedPattern"], "172801") and not re.fullmatch(
        timeout["allowedPattern"], "0"
    )
    (step,) = document["mainSteps"]
    assert step["action"] == "aws:runShellScript"
    assert step["inputs"]["timeoutSeconds"] == "{{ executionTimeout }}"


def test_ssm_job_spec_pattern_matches_the_python_transport():
    ssm = pytest.importorskip("batchworker.transports.ssm")
    assert ssm.JOB_SPEC_PATTERN == JOB_SPEC_PATTERN


def test_ssm_document_run_command_passes_a_hostile_key_only_on_stdin(tf, tmp_path):
    # GIVEN the document's runCommand, with the parts that need root or an instance stubbed out
    ready = tmp_path / "ready"
    ready.touch()
    received = tmp_path / "stdin.json"
    pwned = tmp_path / "pwned"
    job_command = tmp_path / "launch"
    job_command.write_text(f'#!/bin/sh\ncat > {received}\necho \'{{"job_id": "j-0", "pid": 1}}\'\n')
    job_command.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    runuser = bin_dir / "runuser"  # runuser -u USER -- CMD...: run CMD as ourselves
    runuser.write_text('#!/bin/sh\nshift 3\nexec "$@"\n')
    runuser.chmod(0o755)
    hostile_key = f"x'; touch {pwned}; echo '$(touch {pwned})`touch {pwned}`\" && touch {pwned} #.png"
    spec = {"job_id": "j-0123456789abcdef", "input": {"bucket": "in", "key": hostile_key, "version_id": None}}
    encoded = base64.b64encode(json.dumps(spec).encode()).decode()
    assert re.fullmatch(JOB_SPEC_PATTERN, encoded)
    lines = _ssm_document(tf)["mainSteps"][0]["inputs"]["runCommand"]
    script = "\n".join(lines)
    script = script.replace("/run/batchworker/ready", str(ready))
    script = script.replace("${var.ssh_user}", "nobody").replace("${var.job_command}", str(job_command))
    script = script.replace("{{ JobSpec }}", encoded)  # what SSM does with the parameter
    assert "${" not in script and "{{" not in script
    # WHEN the agent runs it (POSIX sh, as the SSM agent may)
    result = subprocess.run(
        ["/bin/sh", "-c", script], check=False, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    # THEN the launcher got the spec byte for byte on stdin, and nothing in the key ran
    assert result.returncode == 0, result.stderr
    assert json.loads(received.read_text()) == spec
    assert not pwned.exists()
    assert json.loads(result.stdout.strip().splitlines()[-1])["job_id"] == "j-0"


def _dynamic_statements(tf, document: str) -> dict[str, dict]:
    """Dynamic statements of a policy document, by the value their for_each yields (their sid)."""
    found = {}
    for dynamic in tf["data"]["aws_iam_policy_document"][document].get("dynamic", []):
        block = dynamic.get("statement")
        if block:
            match = re.search(r'\["(\w+)"\]', block["for_each"])
            found[match.group(1) if match else block["for_each"]] = block["content"][0]
    return found


def test_worker_sends_commands_only_with_the_document_to_pool_instances(tf):
    statements = _dynamic_statements(tf, "worker")
    senders = {sid: s for sid, s in statements.items() if "ssm:SendCommand" in _actions(s)}
    assert set(senders) == {"SendRunJobDocument", "SendCommandToPoolInstances"}
    document = senders["SendRunJobDocument"]
    assert document["resources"] == ["${aws_ssm_document.run_job.arn}"]
    instances = senders["SendCommandToPoolInstances"]
    assert instances["resources"] == ["${local.instance_arn_pattern}"]
    (condition,) = instances["condition"]
    assert (condition["test"], condition["variable"], condition["values"]) == (
        "StringEquals", SSM_POOL_CONDITION_KEY, ["${var.name_prefix}"],
    )  # fmt: skip
    for sid, statement in senders.items():
        assert _actions(statement) == ["ssm:SendCommand"], sid


def test_worker_reads_only_its_own_parameters(tf):
    for statement in _blocks(tf["data"]["aws_iam_policy_document"]["worker"], "statement"):
        if "ssm:GetParameter" in _actions(statement):
            assert statement["resources"] == [
                "arn:${local.partition}:ssm:${var.region}:${local.account_id}:parameter${local.ssh_endpoint_pattern}",
                "${local.parameter_arn_prefix}/ssh/private-key",
            ]


def test_send_command_is_never_granted_on_every_resource(tf):
    for document, statements in _policy_statements(tf).items():
        for statement in statements:
            if "ssm:SendCommand" in _actions(statement):
                assert statement["resources"] != ["*"], document


def test_instance_role_writes_only_its_own_ssh_endpoint(tf):
    gpu = tf["data"]["aws_iam_policy_document"]["gpu"]
    puts = [s for s in _blocks(gpu, "statement") if "ssm:PutParameter" in _actions(s)]
    assert len(puts) == 1
    (put,) = puts
    assert put["resources"] == ["${local.parameter_arn_prefix}/instances/${statement.value}/ssh-endpoint"]
    (condition,) = put["condition"]
    assert condition["variable"] == "ec2:SourceInstanceARN"
    assert condition["values"][0].endswith(":instance/${statement.value}")
    # No other statement of any policy may write parameters.
    for document, statements in _policy_statements(tf).items():
        for statement in statements:
            if statement is not put:
                assert not {"ssm:PutParameter", "ssm:DeleteParameter"} & set(_actions(statement)), document


def test_instance_role_has_no_account_wide_parameter_read(tf):
    for statement in _blocks(tf["data"]["aws_iam_policy_document"]["gpu"], "statement"):
        if {"ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"} & set(_actions(statement)):
            assert statement["resources"] == ["${local.parameter_arn_prefix}/job-package"]
    assert "AmazonSSMManagedInstanceCore" not in json.dumps(
        tf["resource"].get("aws_iam_role_policy_attachment", {})
    )


# --- buckets, queues, logs ------------------------------------------------------------------------


def test_every_bucket_is_locked_down(tf):
    resources = tf["resource"]
    for kind in (
        "aws_s3_bucket_public_access_block",
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_s3_bucket_lifecycle_configuration",
    ):
        assert resources[kind]["this"]["for_each"] == "${aws_s3_bucket.this}", kind
    block = resources["aws_s3_bucket_public_access_block"]["this"]
    assert all(block[key] is True for key in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                             "restrict_public_buckets"))  # fmt: skip
    assert (
        '"input"' not in resources["aws_s3_bucket_versioning"]["this"]["for_each"]
    )  # only output is excluded
    assert 'name != "output"' in resources["aws_s3_bucket_versioning"]["this"]["for_each"]
    assert resources["aws_s3_bucket_policy"]["this"]["for_each"].startswith("${var.tls_only_bucket_policy ?")
    (statement,) = _policy_statements(tf)["tls_only"]
    assert statement["effect"] == "Deny"
    assert statement["condition"][0]["variable"] == "aws:SecureTransport"


def test_every_queue_is_encrypted_and_drains_to_a_dlq(tf):
    queues = tf["resource"]["aws_sqs_queue"]
    for name, queue in queues.items():
        assert queue.get("sqs_managed_sse_enabled") is True or queue.get("kms_master_key_id"), name
    redrives = tf["resource"]["aws_sqs_queue_redrive_policy"]
    for name in ("jobs", "done"):
        policy = redrives[name]["redrive_policy"]
        assert f"aws_sqs_queue.{name}_dlq.arn" in policy and "maxReceiveCount" in policy, name


def test_reaper_runs_on_a_schedule(tf):
    assert "reaper" in tf["locals"]["lambda_timeout_seconds"]
    rule = tf["resource"]["aws_cloudwatch_event_rule"]["reaper"]
    assert rule["schedule_expression"] == "${var.reaper_schedule_expression}"
    assert tf["variable"]["reaper_schedule_expression"]["default"].startswith("rate(")
    target = tf["resource"]["aws_cloudwatch_event_target"]["reaper"]
    assert target["rule"] == "${aws_cloudwatch_event_rule.reaper.name}"
    assert target["arn"] == '${aws_lambda_function.this["reaper"].arn}'
    permission = tf["resource"]["aws_lambda_permission"]["reaper_schedule"]
    assert permission["principal"] == "events.amazonaws.com"
    assert permission["source_arn"] == "${aws_cloudwatch_event_rule.reaper.arn}"


def test_instance_renews_only_the_lease_attributes_the_job_writes(tf):
    # GIVEN the updates worker/lease.py makes on the job's item (every "name = :value" their SET clauses hold:
    # the lease renewal's, and the network problem note's)
    source = (REPO_ROOT / "worker" / "lease.py").read_text()
    body = source[source.index("def renew_lease"):source.index("class Heartbeat")]
    names = set(re.findall(r'"(?:SET )?([a-z_]+) = :', body)) | {"job_id"}
    assert {"lease_expires_at", "running_since", "instance_problem"} <= names
    aliases = dict(re.findall(r'"(#\w+)": "(\w+)"', body))
    names |= {aliases[alias] for alias in re.findall(r'"(#\w+) = :', body) if alias in aliases}
    names |= {
        aliases[alias]
        for alias in re.findall(r'ConditionExpression="([^"]*)"', body)[0].split()
        if alias in aliases
    }
    # THEN the instance role's dynamodb:Attributes condition admits exactly those
    (lease,) = [
        s
        for s in _blocks(tf["data"]["aws_iam_policy_document"]["gpu"], "statement")
        if s.get("sid") == "RenewJobLease"
    ]
    assert _actions(lease) == ["dynamodb:UpdateItem"]
    (condition,) = lease["condition"]
    assert (condition["test"], condition["variable"]) == ("ForAllValues:StringEquals", "dynamodb:Attributes")
    assert set(tf["locals"]["job_lease_attributes"]) == names


def test_worker_async_failures_go_to_a_dead_letter_queue(tf):
    config = tf["resource"]["aws_lambda_function_event_invoke_config"]["worker"]
    assert 'aws_lambda_function.this["worker"]' in config["function_name"]
    assert (
        config["destination_config"][0]["on_failure"][0]["destination"] == "${aws_sqs_queue.worker_dlq.arn}"
    )


def test_log_groups_have_retention(tf):
    group = tf["resource"]["aws_cloudwatch_log_group"]["lambda"]
    assert group["retention_in_days"] == "${var.log_retention_days}"
    assert group["for_each"] == "${local.lambda_timeout_seconds}"


def test_tags_reach_every_resource(tf):
    providers = [body for entry in _load_providers() for body in entry.values()]
    assert any(body.get("default_tags", [{}])[0].get("tags") == "${var.tags}" for body in providers)
    template = tf["resource"]["aws_launch_template"]["gpu"]
    assert {spec["resource_type"] for spec in template["tag_specifications"]} == {
        "volume",
        "network-interface",
    }


def _load_providers() -> list[dict]:
    import hcl2

    with (TERRAFORM_DIR / "providers.tf").open() as handle:
        return _normalize(hcl2.load(handle)).get("provider", [])


def test_gpu_security_group_egress_is_https_only(tf):
    (egress,) = tf["resource"]["aws_security_group"]["gpu"]["egress"]
    assert (egress["from_port"], egress["to_port"], egress["protocol"]) == (443, 443, "tcp")


# --- user data ------------------------------------------------------------------------------------

_TEMPLATE_VARIABLE = re.compile(r"\$\{(\w+)\}")


def _render_user_data(**overrides: str) -> str:
    values = {
        "parameter_prefix": "/batchworker",
        "region": "us-east-1",
        "transport": "ssh",
        "job_user": "ubuntu",
        "job_command": "/opt/batchworker/bin/batchworker-launch",
        "job_root": "/var/lib/batchworker/jobs",
        "job_package_pointer": "/batchworker/job-package",
        "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ2yjeHEy0jhNg6BSvbpIkOjdF1OjX6r5c0wEiGgFTJq",
        "packages_uri": "s3://batchworker-artifacts-123456789012/job-packages/",
        "default_job": "digits",
        "instance_events_table": "batchworker-instance-events",
        **overrides,
    }
    text = USER_DATA_TEMPLATE.read_text()
    assert "%{" not in text  # no template directives: the text is shell, only ${name} is Terraform's
    return _TEMPLATE_VARIABLE.sub(lambda match: values[match.group(1)], text)


def _heredoc(text: str, delimiter: str) -> str:
    match = re.search(rf"<<'?{delimiter}'?\n(.*?)\n{delimiter}\n", text, re.DOTALL)
    assert match, f"no heredoc {delimiter}"
    return match.group(1)


def test_user_data_template_variables_match_the_templatefile_call():
    used = set(_TEMPLATE_VARIABLE.findall(USER_DATA_TEMPLATE.read_text()))
    call = re.search(
        r"templatefile\([^,]+user_data\.sh\.tftpl\",\s*\{(.*?)\}\)",
        (TERRAFORM_DIR / "ec2.tf").read_text(),
        re.DOTALL,
    )
    assert call, "ec2.tf does not render templates/user_data.sh.tftpl"
    passed = set(re.findall(r"^\s*(\w+)\s*=", call.group(1), re.MULTILINE))
    assert used == passed


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@pytest.mark.parametrize("transport", ["ssm", "ssh"])
def test_user_data_is_valid_shell_and_python(tmp_path, transport):
    user_data = _render_user_data(transport=transport)
    boot = _heredoc(user_data, "BOOT")
    helper = _heredoc(user_data, "PY")
    for name, text in {"user_data.sh": user_data, "boot.sh": boot}.items():
        path = tmp_path / name
        path.write_text(text)
        result = subprocess.run(["bash", "-n", str(path)], check=False, capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"
    compile(helper, "boot_helper.py", "exec")
    assert user_data.startswith("#!/bin/bash\n")
    assert len(user_data.encode()) < 16 * 1024  # EC2's user data limit (before base64)
    # IMDSv2 only: every metadata read carries a token.
    assert "X-aws-ec2-metadata-token:" in boot and "latest/api/token" in boot
    # The worker function's key may only run the job command.
    assert 'restrict,command=\\"$JOB_COMMAND\\"' in boot


def test_user_data_publishes_the_endpoint_the_worker_reads():
    boot = _heredoc(_render_user_data(), "BOOT")
    helper = _heredoc(_render_user_data(), "PY")
    assert '"$PARAMETER_PREFIX/instances/$INSTANCE_ID/ssh-endpoint"' in boot  # docs/architecture.md
    assert '{"host": host, "port": 22, "host_key": host_key}' in helper
    assert "local-ipv4" in boot and "ssh_host_ed25519_key.pub" in boot


# --- examples ---------------------------------------------------------------------------------------


def test_minimal_example_uses_this_configuration():
    text = (REPO_ROOT / "examples" / "minimal" / "main.tf").read_text()
    assert re.search(r'source\s*=\s*"\.\./\.\./terraform"', text)


# --- build_lambdas.py ------------------------------------------------------------------------------


def _fake_repo(root: Path) -> Path:
    files = {
        "pyproject.toml": '[project]\nname = "batchworker"\nversion = "9.8.7"\nrequires-python = ">=3.11"\n',
        "batchworker/__init__.py": "",
        "batchworker/config.py": "X = 1\n",
        "batchworker/transports/ssh.py": "Y = 2\n",
        "batchworker/local/supervisor.py": "raise ImportError\n",
        "batchworker/cli/main.py": "raise ImportError\n",
        "batchworker/__pycache__/config.cpython-311.py": "",
        "batchworker/notes.txt": "not python\n",
        "batchworker/errors.py": "class PermanentError(Exception):\n    pass\n",
        **{f"batchworker/jobpkg/{name}.py": "" for name in ("__init__", "archive", "config", "errors")},
        "worker/__init__.py": "",
        "worker/cli.py": "def main():\n    return 0\n",
        "worker/__pycache__/cli.cpython-311.py": "",
    }
    files.update(
        {
            f"lambdas/{name}/app.py": f"def handler(event, context):\n    return {name!r}\n"
            for name in ("trigger", "worker", "stop", "reaper")
        }
    )
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _build(repo: Path, out: Path) -> None:
    subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--repo-root", str(repo), "--out", str(out)],
        check=True,
        capture_output=True,
    )


def test_build_lambdas_is_reproducible(tmp_path):
    # GIVEN a source tree
    repo = _fake_repo(tmp_path / "repo")
    # WHEN it is built twice, the files' mtimes changing in between
    _build(repo, tmp_path / "first" / "lambdas")
    for path in repo.rglob("*.py"):
        path.touch()
    _build(repo, tmp_path / "second" / "lambdas")
    # THEN the zips and the job package are byte-identical
    for name in ("lambdas/trigger.zip", "lambdas/worker.zip", "lambdas/stop.zip", "lambdas/reaper.zip",
                 "job/batchworker_job-9.8.7-py3-none-any.whl", "job/job-package.json"):  # fmt: skip
        first = (tmp_path / "first" / name).read_bytes()
        assert first == (tmp_path / "second" / name).read_bytes(), name


def test_job_package_is_an_installable_wheel(tmp_path):
    # GIVEN the job package of a source tree
    repo = _fake_repo(tmp_path / "repo")
    subprocess.run(
        [sys.executable, str(JOB_PACKAGE_SCRIPT), "--repo-root", str(repo), "--out", str(tmp_path / "job")],
        check=True, capture_output=True,
    )  # fmt: skip
    descriptor = json.loads((tmp_path / "job" / "job-package.json").read_text())
    wheel = tmp_path / "job" / descriptor["wheel"]
    # THEN job-package.json names it, with its sha256, as Terraform and user data expect
    assert descriptor["wheel"] == "batchworker_job-9.8.7-py3-none-any.whl"
    assert descriptor["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        # no bytecode, and of the shared core only what unpacks and reads job packages
        jobpkg = [f"batchworker/jobpkg/{name}.py" for name in ("__init__", "archive", "config", "errors")]
        assert names[:8] == ["batchworker/__init__.py", "batchworker/errors.py", *jobpkg,
                             "worker/__init__.py", "worker/cli.py"]
        assert names[-1] == "batchworker_job-9.8.7.dist-info/RECORD"
        metadata = archive.read("batchworker_job-9.8.7.dist-info/METADATA").decode()
        assert "Name: batchworker-job\nVersion: 9.8.7\n" in metadata
        assert "Requires-Python: >=3.11" in metadata and "torch" not in metadata
        entry_points = archive.read("batchworker_job-9.8.7.dist-info/entry_points.txt").decode()
        assert "batchworker-job = worker.cli:main" in entry_points
        # AND every file's RECORD hash is right (pip checks them on install)
        record = archive.read(names[-1]).decode().splitlines()
        for line in record[:-1]:
            name, digest, size = line.rsplit(",", 2)
            data = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(data), name
        for info in archive.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert stat.S_IMODE(info.external_attr >> 16) == 0o644


def test_build_lambdas_contents(tmp_path):
    repo = _fake_repo(tmp_path / "repo")
    _build(repo, tmp_path / "out" / "lambdas")
    with zipfile.ZipFile(tmp_path / "out" / "lambdas" / "worker.zip") as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        assert names == sorted(names)
        assert names == [
            "app.py",
            "batchworker/__init__.py",
            "batchworker/config.py",
            "batchworker/errors.py",
            *[f"batchworker/jobpkg/{name}.py" for name in ("__init__", "archive", "config", "errors")],
            "batchworker/transports/ssh.py",
        ]
        assert "'worker'" in archive.read("app.py").decode()
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert (info.external_attr >> 16) & 0o777 == 0o644
            assert info.compress_type == zipfile.ZIP_DEFLATED


@pytest.mark.skipif(
    not all(
        (REPO_ROOT / "lambdas" / name / "app.py").is_file()
        for name in ("trigger", "worker", "stop", "reaper")
    ),
    reason="Lambda handlers not written yet",
)
def test_build_lambdas_is_reproducible_for_this_repo(tmp_path):
    _build(REPO_ROOT, tmp_path / "first" / "lambdas")
    _build(REPO_ROOT, tmp_path / "second" / "lambdas")
    for name in (
        "lambdas/trigger.zip",
        "lambdas/worker.zip",
        "lambdas/stop.zip",
        "lambdas/reaper.zip",
        "job/job-package.json",
    ):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def test_lambda_dependencies_are_locked_with_hashes():
    lines = [
        line for line in (REPO_ROOT / "scripts" / "lambda-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    names = set()
    for line in lines:
        assert re.fullmatch(r"[a-z0-9-]+==[0-9][^ ]* --hash=sha256:[0-9a-f]{64}", line), line
        names.add(line.split("==")[0])
    assert {"aws-lambda-powertools", "paramiko"} <= names


def test_readme_lists_every_input_and_output(tf):
    readme = (TERRAFORM_DIR / "README.md").read_text()
    inputs = readme[readme.index("## Inputs") : readme.index("## Outputs")]
    outputs = readme[readme.index("## Outputs") :]
    for name in tf["variable"]:
        assert f"| `{name}` |" in inputs, f"terraform/README.md: input {name} missing"
    for name in tf["output"]:
        assert f"| `{name}` |" in outputs, f"terraform/README.md: output {name} missing"


def test_trigger_may_read_the_pool_idle_gap_record(tf):
    # GIVEN the trigger's placer reads the pool's idle gaps (IdleGaps.note_arrival -> get_item)
    source = (REPO_ROOT / "batchworker" / "idle_gaps.py").read_text()
    assert "get_item(" in source
    # THEN the trigger role grants dynamodb:GetItem on the instance-events table (the blocker of issue 11)
    statements = _blocks(tf["data"]["aws_iam_policy_document"]["trigger"], "statement")
    (events,) = [s for s in statements if s.get("sid") == "InstanceEventsTable"]
    assert "dynamodb:GetItem" in _actions(events)


# --- issue 14: what AWS does that moto hides -------------------------------------------------------


def test_a_new_ami_or_template_version_never_replaces_an_instance(tf):
    # The instances keep the launch template version they were made from; the operator rolls them.
    instance = tf["resource"]["aws_instance"]["gpu"]
    ignored = {str(name) for block in instance["lifecycle"] for name in block["ignore_changes"]}
    assert {"launch_template", "user_data"} <= ignored
    assert "Ubuntu 24.04" in _raw_terraform_text()  # the supported DLAMI line
    readme = (TERRAFORM_DIR / "README.md").read_text()
    assert "### Rolling the instances" in readme and "-replace='aws_instance.gpu[0]'" in readme


def test_the_pool_spreads_over_subnet_ids_and_keeps_subnet_id_working(tf):
    text = (TERRAFORM_DIR / "ec2.tf").read_text()
    assert "length(var.subnet_ids) > 0 ? var.subnet_ids : compact([var.subnet_id])" in text
    assert "local.pool_subnet_ids[count.index % length(local.pool_subnet_ids)]" in text
    assert tf["variable"]["subnet_ids"]["default"] == []


def test_batch_size_over_ten_without_a_batching_window_fails_the_plan(tf):
    # Terraform 1.0 has no cross-variable validation: the trigger's mapping takes its window from a local
    # that cannot be converted to a number when the rule is broken (checked with terraform 1.11: the plan
    # fails naming both variables).
    mappings = tf["resource"]["aws_lambda_event_source_mapping"]
    windows = {name: str(body["maximum_batching_window_in_seconds"]).strip("${}") for name, body in mappings.items()}
    assert windows["jobs"] == "local.trigger_batching_window_seconds"
    guard = str(tf["locals"]["trigger_batching_window_seconds"])
    assert "var.event_source_batch_size > 10 && var.trigger_batching_window_seconds < 1" in guard
    assert guard.startswith("${tonumber(") and "needs trigger_batching_window_seconds of at least 1" in guard
    # every other mapping has a window of at least 1 s of its own
    assert all(int(window) >= 1 for name, window in windows.items() if name != "jobs")


def test_global_names_carry_the_region(tf):
    # Buckets (global) and IAM roles and the instance profile (account-wide): a second region with the same
    # name_prefix must not collide. The bucket name's 63-character limit fails the plan with a message.
    assert tf["locals"]["global_name_suffix"] == '${var.region_in_global_names ? "-${var.region}" : ""}'
    assert tf["variable"]["region_in_global_names"]["default"] is True
    assert "bucket names would exceed 63 characters" in str(tf["locals"]["bucket_names"])
    roles = tf["resource"]["aws_iam_role"]
    assert all(role["name"].endswith("${local.global_name_suffix}") for role in roles.values())
    assert tf["resource"]["aws_iam_instance_profile"]["gpu"]["name"].endswith("${local.global_name_suffix}")


def test_both_tables_expire_their_rows(tf):
    for table in ("jobs", "instance_events"):
        [ttl] = tf["resource"]["aws_dynamodb_table"][table]["ttl"]
        assert ttl == {"attribute_name": "expires_at", "enabled": True}, table
    assert tf["locals"]["lambda_environment"]["BATCHWORKER_JOB_RETENTION_DAYS"] == "${tostring(var.job_retention_days)}"


def test_the_status_index_is_sharded_and_carries_nothing_a_lease_renewal_writes(tf):
    from batchworker.jobs import INDEX_ATTRIBUTES, RENEWED_ATTRIBUTES, SHARD_ATTRIBUTE, STATUS_INDEX

    table = tf["resource"]["aws_dynamodb_table"]["jobs"]
    [index] = table["global_secondary_index"]
    # GIVEN the index the code queries, keyed by "<status>#<shard>", oldest first
    assert (index["name"], index["hash_key"], index["range_key"]) == (STATUS_INDEX, SHARD_ATTRIBUTE, "created_at")
    assert {a["name"] for a in table["attribute"]} == {"job_id", SHARD_ATTRIBUTE, "created_at"}
    # THEN it projects what its readers use, as the code (and the tests' tables) declare it
    assert index["projection_type"] == "INCLUDE"
    assert tuple(index["non_key_attributes"]) == INDEX_ATTRIBUTES
    # AND none of what a plain renewal writes (worker/lease.py SETs only those): renewals never write to it
    source = (REPO_ROOT / "worker" / "lease.py").read_text()
    body = source[source.index("def renew_lease"):source.index("def note_instance_problem")]
    started = body[body.index("if started is not False:"):body.index("if progress")]  # once per job, with the status
    plain = set(re.findall(r'"([a-z_]+) = :', body)) - set(re.findall(r'"([a-z_]+) = :', started))
    assert plain == set(RENEWED_ATTRIBUTES)
    assert not set(RENEWED_ATTRIBUTES) & set(INDEX_ATTRIBUTES)


def test_both_root_modules_commit_one_provider_lock_for_every_platform():
    # `terraform init` on macOS or arm64 must find the hashes of its own platform's release in the lock
    # (zh: one per platform the registry publishes), and the offline mirror's linux_amd64 package (h1:) too.
    locks = [(REPO_ROOT / root / ".terraform.lock.hcl").read_text() for root in ("terraform", "examples/minimal")]
    assert locks[0] == locks[1], "terraform/ and examples/minimal/ lock different provider builds"
    version = re.search(r'provider "registry.terraform.io/hashicorp/aws" \{\s*version\s*=\s*"([^"]+)"', locks[0])
    assert version and version.group(1).startswith("5."), "the lock must pin hashicorp/aws within ~> 5.0"
    platforms = re.findall(r'"zh:[0-9a-f]{64}"', locks[0])
    assert len(platforms) >= 4, f"release hashes for {len(platforms)} platforms only (linux/darwin x amd64/arm64)"
    assert re.findall(r'"h1:[A-Za-z0-9+/=]{44}"', locks[0]), "no h1: hash for the offline mirror's package"
