"""Static checks of terraform/ (parsed with python-hcl2) and of scripts/build_lambdas.py determinism.

moto enforces no IAM and ignores conditions, so the tag-scoped policies are checked here, from the HCL.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import hcl2
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO_ROOT / "terraform"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_lambdas.py"
POOL_CONDITION_KEY = "ec2:ResourceTag/batchworker:pool"


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
    assert "${each.key}" in bucket["bucket"]
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
    expected = {
        f"BATCHWORKER_{field.upper()}"
        for field in (
            "input_bucket output_bucket jobs_table instance_events_table pool_tag worker_function model_uri "
            "parameter_prefix ssh_user job_command instance_ready_timeout_seconds"
        ).split()
    }
    assert expected | {"POWERTOOLS_SERVICE_NAME"} == set(environment)


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


# --- build_lambdas.py ------------------------------------------------------------------------------


def _fake_repo(root: Path) -> Path:
    files = {
        "batchworker/__init__.py": "",
        "batchworker/config.py": "X = 1\n",
        "batchworker/transports/ssh.py": "Y = 2\n",
        "batchworker/local/supervisor.py": "raise ImportError\n",
        "batchworker/cli/main.py": "raise ImportError\n",
        "batchworker/__pycache__/config.cpython-311.py": "",
        "batchworker/notes.txt": "not python\n",
    }
    files.update(
        {
            f"lambdas/{name}/app.py": f"def handler(event, context):\n    return {name!r}\n"
            for name in ("trigger", "worker", "stop")
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
    _build(repo, tmp_path / "first")
    for path in repo.rglob("*.py"):
        path.touch()
    _build(repo, tmp_path / "second")
    # THEN the zips are byte-identical
    for name in ("trigger", "worker", "stop"):
        first = (tmp_path / "first" / f"{name}.zip").read_bytes()
        assert first == (tmp_path / "second" / f"{name}.zip").read_bytes(), name


def test_build_lambdas_contents(tmp_path):
    repo = _fake_repo(tmp_path / "repo")
    _build(repo, tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "out" / "worker.zip") as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        assert names == sorted(names)
        assert names == [
            "app.py",
            "batchworker/__init__.py",
            "batchworker/config.py",
            "batchworker/transports/ssh.py",
        ]
        assert "'worker'" in archive.read("app.py").decode()
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert (info.external_attr >> 16) & 0o777 == 0o644
            assert info.compress_type == zipfile.ZIP_DEFLATED


@pytest.mark.skipif(
    not all((REPO_ROOT / "lambdas" / name / "app.py").is_file() for name in ("trigger", "worker", "stop")),
    reason="Lambda handlers not written yet",
)
def test_build_lambdas_is_reproducible_for_this_repo(tmp_path):
    _build(REPO_ROOT, tmp_path / "first")
    _build(REPO_ROOT, tmp_path / "second")
    for name in ("trigger", "worker", "stop"):
        assert (tmp_path / "first" / f"{name}.zip").read_bytes() == (
            tmp_path / "second" / f"{name}.zip"
        ).read_bytes()
