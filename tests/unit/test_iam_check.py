"""The IAM check's pieces: policy evaluation, call -> action/ARN mapping, iam.tf markers (no cloud)."""

from __future__ import annotations

import pytest

from batchworker.iamcheck.actions import Deployment, UnmappedCall, expression_attributes, requests_for
from batchworker.iamcheck.evaluate import ALLOWED, DENIED, UNCHECKED, Request, evaluate
from batchworker.iamcheck.markers import read_markers, reason_for, statements_of
from batchworker.local.paths import TERRAFORM_DIR

D = Deployment("aws", "us-east-1", "123456789012", {"i-1": {"batchworker:pool": "bw"}})
POOL_START = {"Sid": "Start", "Effect": "Allow", "Action": "ec2:StartInstances",
              "Resource": "arn:aws:ec2:us-east-1:123456789012:instance/*",
              "Condition": {"StringEquals": {"ec2:ResourceTag/batchworker:pool": "bw"}}}


def policy(*statements):
    return {"Version": "2012-10-17", "Statement": list(statements)}


def call(service, operation, result="ok", principal="lambda:f", response=None, **params):
    return {"principal": principal, "service": service, "operation": operation, "params": params,
            "result": result, **({"response": response} if response else {})}


@pytest.mark.parametrize(("request_", "expected"), [
    (Request("ec2:StartInstances", "arn:aws:ec2:us-east-1:123456789012:instance/i-1",
             {"ec2:ResourceTag/batchworker:pool": "bw"}), ALLOWED),
    (Request("EC2:startinstances", "arn:aws:ec2:us-east-1:123456789012:instance/i-1",
             {"ec2:resourcetag/batchworker:pool": "bw"}), ALLOWED),  # action and key names ignore case
    (Request("ec2:StartInstances", "arn:aws:ec2:us-east-1:123456789012:instance/i-2",
             {"ec2:ResourceTag/batchworker:pool": "other"}), DENIED),
    (Request("ec2:StartInstances", "arn:aws:ec2:us-east-1:123456789012:instance/i-3",
             {"ec2:ResourceTag/batchworker:pool": None}), DENIED),  # untagged
    (Request("ec2:StartInstances", "arn:aws:ec2:us-east-1:123456789012:instance/i-3"), UNCHECKED),  # tags unknown
    (Request("ec2:StopInstances", "arn:aws:ec2:us-east-1:123456789012:instance/i-1",
             {"ec2:ResourceTag/batchworker:pool": "bw"}), DENIED),
])
def test_tag_conditions_are_evaluated_or_reported_unchecked(request_, expected):
    assert evaluate([policy(POOL_START)], request_).result == expected


def test_explicit_deny_wins_and_wildcards_are_iam_wildcards():
    allow = {"Sid": "A", "Effect": "Allow", "Action": "s3:Get*", "Resource": "arn:aws:s3:::b/jobs/*"}
    deny = {"Sid": "D", "Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/jobs/secret?"}
    assert evaluate([policy(allow, deny)], Request("s3:GetObject", "arn:aws:s3:::b/jobs/x")).result == ALLOWED
    assert evaluate([policy(allow, deny)], Request("s3:GetObject", "arn:aws:s3:::b/jobs/secret1")).result == DENIED
    # "." in a pattern is literal, not a regex wildcard
    dotted = {"Sid": "M", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/m.pt"}
    assert evaluate([policy(dotted)], Request("s3:GetObject", "arn:aws:s3:::b/mXpt")).result == DENIED


def test_for_all_values_attributes_condition():
    lease = {"Sid": "L", "Effect": "Allow", "Action": "dynamodb:UpdateItem", "Resource": "arn:t",
             "Condition": {"ForAllValues:StringEquals": {"dynamodb:Attributes": ["job_id", "status"]}}}
    ok = Request("dynamodb:UpdateItem", "arn:t", {"dynamodb:Attributes": ["job_id", "status"]})
    extra = Request("dynamodb:UpdateItem", "arn:t", {"dynamodb:Attributes": ["job_id", "instance_id"]})
    assert evaluate([policy(lease)], ok).result == ALLOWED
    assert evaluate([policy(lease)], extra).result == DENIED
    as_tuple = Request("dynamodb:UpdateItem", "arn:t", {"dynamodb:Attributes": ("job_id", "status")})
    assert evaluate([policy(lease)], as_tuple).result == ALLOWED


def test_an_unknown_operator_is_unchecked_never_allowed():
    odd = {"Sid": "N", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*",
           "Condition": {"DateGreaterThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}}}
    decision = evaluate([policy(odd)], Request("s3:GetObject", "arn:aws:s3:::b/k", {"aws:CurrentTime": "x"}))
    assert decision.result == UNCHECKED and "DateGreaterThan" in decision.unchecked[0]


@pytest.mark.parametrize(("recorded", "expected"), [
    (call("s3", "HeadObject", Bucket="in", Key="a b/c"), [("s3:GetObject", "arn:aws:s3:::in/a b/c")]),
    (call("s3", "GetObject", Bucket="in", Key="k", VersionId="v1"), [("s3:GetObjectVersion", "arn:aws:s3:::in/k")]),
    (call("s3", "ListObjectsV2", Bucket="out", Prefix="jobs/j-1/"), [("s3:ListBucket", "arn:aws:s3:::out")]),
    (call("s3", "GetObject", result="NoSuchKey", Bucket="out", Key="jobs/x"),
     [("s3:GetObject", "arn:aws:s3:::out/jobs/x"), ("s3:ListBucket", "arn:aws:s3:::out")]),
    (call("dynamodb", "Query", TableName="jobs", IndexName="status-index"),
     [("dynamodb:Query", "arn:aws:dynamodb:us-east-1:123456789012:table/jobs/index/status-index")]),
    (call("dynamodb", "BatchGetItem", RequestItems=["events"]),
     [("dynamodb:BatchGetItem", "arn:aws:dynamodb:us-east-1:123456789012:table/events")]),
    (call("lambda", "Invoke", FunctionName="bw-worker", InvocationType="Event"),
     [("lambda:InvokeFunction", "arn:aws:lambda:us-east-1:123456789012:function:bw-worker")]),
    (call("lambda", "Invoke", FunctionName="bw-worker", Qualifier="live"),
     [("lambda:InvokeFunction", "arn:aws:lambda:us-east-1:123456789012:function:bw-worker:live")]),
    (call("sqs", "DeleteMessageBatch", QueueUrl="http://127.0.0.1:1/123456789012/bw-jobs"),
     [("sqs:DeleteMessage", "arn:aws:sqs:us-east-1:123456789012:bw-jobs")]),
    (call("ssm", "GetParameter", Name="/bw/ssh/private-key", WithDecryption=True,
          response={"ParameterType": "SecureString"}),
     [("ssm:GetParameter", "arn:aws:ssm:us-east-1:123456789012:parameter/bw/ssh/private-key"),
      ("kms:Decrypt", "arn:aws:kms:us-east-1:123456789012:key/aws-ssm-default-key")]),
    (call("ec2", "StartInstances", InstanceIds=["i-1"]),
     [("ec2:StartInstances", "arn:aws:ec2:us-east-1:123456789012:instance/i-1")]),
])
def test_calls_map_to_the_actions_and_arns_iam_checks(recorded, expected):
    assert [(r.action, r.resource) for r in requests_for(recorded, D)] == expected


def test_mapping_carries_tags_attributes_and_the_source_instance():
    start = requests_for(call("ec2", "StartInstances", InstanceIds=["i-1"]), D)[0]
    assert start.context == {"ec2:ResourceTag/batchworker:pool": "bw"}
    update = requests_for(call("dynamodb", "UpdateItem", principal="instance:i-1", TableName="jobs", Key=["job_id"],
                               UpdateExpression="SET #s = :s, lease_expires_at = :l REMOVE last_error",
                               ConditionExpression="#s IN (:a, :b) AND attribute_exists(job_id)",
                               ExpressionAttributeNames={"#s": "status"}), D)[0]
    assert update.context["dynamodb:Attributes"] == ["job_id", "last_error", "lease_expires_at", "status"]
    assert update.context["ec2:SourceInstanceARN"] == "arn:aws:ec2:us-east-1:123456789012:instance/i-1"
    assert expression_attributes("SET a.b[0] = :v, c = if_not_exists(c, :z)", {}) == {"a", "c"}


def test_an_operation_without_a_mapping_is_an_error():
    with pytest.raises(UnmappedCall, match="s3:ListBuckets"):
        requests_for(call("s3", "ListBuckets"), D)


def test_every_role_statement_in_iam_tf_has_a_sid_unique_in_its_document():
    statements = [s for s in statements_of((TERRAFORM_DIR / "iam.tf").read_text())
                  if not s[0].endswith("_assume")]
    assert len(statements) > 30
    seen = set()
    for document, sid, _, _, _ in statements:
        assert sid, f"a statement of {document} has no sid: the check names grants by their sid"
        assert (document, sid) not in seen, f"{document}.{sid} twice"
        seen.add((document, sid))


def test_unexercised_markers_are_read_per_statement():
    markers = read_markers(TERRAFORM_DIR / "iam.tf")
    assert all(reasons and all(len(r) > 15 for r in reasons.values()) for reasons in markers.values())
    assert markers[("gpu", "ReadInputs", False)] == {
        "s3:GetObject": "an input without a version id (versioning suspended) is read unversioned."}
    assert set(markers[("trigger", "Logs", False)]) == {"*"}
    # a marker names its own statement only, not every Sid that starts the same; a templated Sid's prefix does
    synthetic = {("gpu", "ReadJobPackage", False): {"*": "why"}, ("gpu", "PublishOwn", True): {"*": "why"}}
    assert reason_for(synthetic, "gpu", "ReadJobPackage", "s3:GetObject") == "why"
    assert reason_for(synthetic, "gpu", "ReadJobPackageArchives", "s3:GetObject") is None
    assert reason_for(synthetic, "gpu", "PublishOwn0", "ssm:PutParameter") == "why"
