"""The IAM check over this session's recorded calls (runs after the other integration tests, see conftest).

Proves the check has teeth: removing any statement a recorded call needs makes it fail; the policies as
they were before issue 11 report its three findings; a boto3 call added to a Lambda (a copy) without a
grant fails it with the action named.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest

from batchworker.iamcheck.check import (
    CALL_LOG_DIR,
    STATE_COPY,
    CheckResult,
    check,
    load_calls,
    without_statement,
)
from batchworker.iamcheck.evaluate import Match, statement_matches
from batchworker.iamcheck.markers import read_markers
from batchworker.iamcheck.state import AppliedState, load_state
from batchworker.local import call_log
from batchworker.local.paths import TERRAFORM_DIR

pytestmark = pytest.mark.integration
MARKERS = read_markers(TERRAFORM_DIR / "iam.tf")


def recorded(predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((c for c in load_calls(CALL_LOG_DIR) if predicate(c)), None)
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no recorded call {what} within {timeout}s")


def failures(result: CheckResult, kind: str) -> str:
    return "\n".join(result.reports[kind].failures)


def test_paths_the_pipeline_tests_do_not_take_are_recorded(local_cloud):
    outputs = json.loads(STATE_COPY.read_text())["outputs"]
    # GIVEN a done-queue event for a manifest that no longer exists: stop's "manifest gone" branch
    key = "jobs/j-00000000000000aa/manifest.json"
    event = {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                          "eventName": "ObjectCreated:Put",
                          "s3": {"bucket": {"name": local_cloud.output_bucket}, "object": {"key": key, "size": 1}}}]}
    local_cloud.client("sqs").send_message(QueueUrl=outputs["done_queue_url"]["value"], MessageBody=json.dumps(event))
    recorded(lambda c: c["principal"].startswith("lambda:") and c["operation"] == "GetObject"
             and c["params"].get("Key") == key and c["result"] == "NoSuchKey", 60, "stop reading a missing manifest")
    # AND the operator's report
    report = local_cloud.cli("report", "--json")
    assert report.returncode == 0, report.stderr


@pytest.fixture(scope="module")
def session(local_cloud) -> tuple[AppliedState, list[dict]]:
    return load_state(STATE_COPY), load_calls(CALL_LOG_DIR)


def test_removing_any_needed_statement_fails_the_check(session):
    applied, calls = session
    baseline = check(calls, applied, MARKERS, lint=False)
    tested = 0
    for kind, role in applied.roles.items():
        requests = baseline.requests[kind]
        for policy in role.documents.values():
            for statement in policy["Statement"]:
                needed = [r for r in requests if statement_matches(statement, r)[0] is Match.YES]
                if not needed:
                    continue  # not exercised: it carries an "# unexercised" reason or the check fails anyway
                # WHEN the statement is gone (what removing it from iam.tf renders)
                result = check(calls, without_statement(applied, kind, statement["Sid"]), MARKERS, lint=False)
                # THEN the check fails, naming the role and an action of the statement
                denied = "\n".join(result.reports[kind].denied)
                assert not result.ok and role.name in denied and needed[0].action in denied, (
                    f"removing {kind}.{statement['Sid']} left the check passing")
                tested += 1
    assert tested >= 25, f"only {tested} statements were exercised"


def test_the_policies_before_issue_11_report_its_findings(session):
    applied, calls = session
    old = copy.deepcopy(applied)
    # GIVEN the statements as they were: no GetItem on instance events (trigger), package archives only
    # without the default job's pointers prewarm reads (instance), no ListBucket on the output bucket (stop)
    for kind, sid, change in [
        ("trigger", "InstanceEventsTable", lambda s: s.update(Action=[a for a in s["Action"] if a != "dynamodb:GetItem"])),
        ("instance", "ReadJobPackageArchives",
         lambda s: s.update(Resource=[r for r in s["Resource"] if not r.endswith(".json")])),
        ("stop", "MissingManifestIs404", lambda s: s.update(Action=["s3:GetObject"], Resource="arn:aws:s3:::none/*")),
    ]:
        for policy in old.roles[kind].documents.values():
            for statement in policy["Statement"]:
                if statement["Sid"] == sid:
                    change(statement)
    result = check(calls, old, MARKERS, lint=False)
    assert not result.ok
    assert "dynamodb:GetItem on arn:aws:dynamodb:" in failures(result, "trigger")
    assert "instance-events" in failures(result, "trigger")
    assert "s3:GetObject on arn:aws:s3:::" in failures(result, "instance") and ".json" in failures(result, "instance")
    assert "s3:ListBucket on arn:aws:s3:::" in failures(result, "stop")


def test_a_boto3_call_added_to_a_lambda_without_a_grant_fails_the_check(session, local_cloud, tmp_path):
    applied, _ = session
    function = next(p.split(":", 1)[1] for p, k in applied.principals.items() if k == "trigger")
    # GIVEN a copy of the trigger's code that also scans the jobs table (no grant for dynamodb:Scan)
    code = tmp_path / "trigger"
    subprocess.run(["cp", "-r", str(local_cloud.local_dir / "lambda-runtime" / "code" / function), str(code)], check=True)
    app = code / "app.py"
    app.write_text(app.read_text() + "\nimport boto3\nboto3.client('dynamodb').scan(TableName=settings.jobs_table, Limit=1)\n")
    config = local_cloud.client("lambda").get_function_configuration(FunctionName=function)
    log_dir = tmp_path / "calls"
    env = call_log.child_environment({
        **os.environ, **local_cloud.env, **config["Environment"]["Variables"], "PYTHONPATH": str(code),
        call_log.LOG_VARIABLE: str(log_dir)}, f"lambda:{function}")
    # WHEN it runs (its module code: clients, settings, and the added call)
    run = subprocess.run([sys.executable, "-c", "import app"], cwd=code, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    # THEN the check fails for the trigger, naming the missing action
    result = check(load_calls(log_dir), applied, MARKERS, lint=False)
    assert not result.ok
    assert any("dynamodb:Scan" in line and applied.roles["trigger"].name in line
               for line in result.reports["trigger"].denied), result.reports["trigger"].denied
