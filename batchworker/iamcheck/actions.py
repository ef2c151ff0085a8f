"""From one recorded SDK call to the IAM authorizations it needs: action(s), resource ARN, condition keys.

The mapping follows the Service Authorization Reference, operation by operation, with the cases that
differ from the operation's name (HeadObject needs s3:GetObject; a versioned read s3:GetObjectVersion;
ListObjectsV2 s3:ListBucket on the bucket; DeleteMessageBatch sqs:DeleteMessage; a Query on an index the
index's ARN; a SecureString read kms:Decrypt through SSM). An operation without a mapping is an error:
add it here rather than let a call go unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from batchworker.iamcheck.evaluate import Request


class UnmappedCall(Exception):
    """A recorded operation this module cannot turn into IAM actions."""


@dataclass(frozen=True)
class Deployment:
    """What ARNs and tag conditions need from the applied state."""

    partition: str
    region: str
    account: str
    instance_tags: Mapping[str, Mapping[str, str]]  # instance id -> tags

    def arn(self, service: str, resource: str, *, region: bool = True, account: bool = True) -> str:
        return (f"arn:{self.partition}:{service}:{self.region if region else ''}:"
                f"{self.account if account else ''}:{resource}")


# (params, response facts, deployment, result) -> the authorizations the call needed.
Mapper = Callable[[Mapping[str, Any], Mapping[str, Any], Deployment, str], list[Request]]


_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


def _s3_object(action: str, versioned_action: str | None = None) -> Mapper:
    def mapper(params, response, d, result="ok"):
        name = versioned_action if versioned_action and params.get("VersionId") else action
        return [Request(name, d.arn("s3", f"{params['Bucket']}/{params['Key']}", region=False, account=False))]
    return mapper


def _s3_read(action: str, versioned_action: str) -> Mapper:
    """A read; one answered "no such key" also needed s3:ListBucket on the bucket, or S3 answers 403 instead.

    For that implicit check the request names no prefix, so a grant conditioned on s3:prefix does not count.
    """
    read = _s3_object(action, versioned_action)

    def mapper(params, response, d, result="ok"):
        requests = read(params, response, d, result)
        if result in _MISSING:
            requests.append(Request("s3:ListBucket", d.arn("s3", params["Bucket"], region=False, account=False),
                                    {"s3:prefix": None}))
        return requests
    return mapper


def _s3_list(params, response, d, result="ok"):
    return [Request("s3:ListBucket", d.arn("s3", params["Bucket"], region=False, account=False),
                    {"s3:prefix": params.get("Prefix", "")})]


_KEYWORDS = {"set", "remove", "add", "delete", "and", "or", "not", "between", "in", "if_not_exists",
             "list_append", "attribute_exists", "attribute_not_exists", "attribute_type", "begins_with",
             "contains", "size"}


def expression_attributes(expression: str | None, names: Mapping[str, str] | None) -> set[str]:
    """Top-level attribute names an update or condition expression touches (placeholders resolved)."""
    if not expression:
        return set()
    found = set()
    # Drop value placeholders and string-free tokens; keep the first element of each document path.
    for token in re.findall(r"(?<![:\w.\[])(#?[A-Za-z_][A-Za-z0-9_]*)", expression):
        if token.startswith("#"):
            found.add((names or {}).get(token, token))
        elif token.lower() not in _KEYWORDS:
            found.add(token)
    return found


def _dynamodb(action: str) -> Mapper:
    def mapper(params, response, d, result="ok"):
        table = d.arn("dynamodb", f"table/{params['TableName']}")
        resource = f"{table}/index/{params['IndexName']}" if params.get("IndexName") else table
        context: dict[str, Any] = {}
        names = params.get("ExpressionAttributeNames")
        if action == "dynamodb:UpdateItem":
            touched = set(params.get("Key", [])) | set(params.get("AttributeUpdates", []))
            touched |= expression_attributes(params.get("UpdateExpression"), names)
            touched |= expression_attributes(params.get("ConditionExpression"), names)
            context["dynamodb:Attributes"] = sorted(touched)
            context["dynamodb:ReturnValues"] = params.get("ReturnValues", "NONE")
        elif action == "dynamodb:PutItem":
            context["dynamodb:Attributes"] = sorted(params.get("Item", []))
            context["dynamodb:ReturnValues"] = params.get("ReturnValues", "NONE")
        elif action == "dynamodb:GetItem":
            # A projection reads those attributes (and the key); without one, the whole item
            projection = expression_attributes(params.get("ProjectionExpression"), names)
            context["dynamodb:Attributes"] = sorted(set(params.get("Key", [])) | projection)
            context["dynamodb:Select"] = "SPECIFIC_ATTRIBUTES" if projection else "ALL_ATTRIBUTES"
        return [Request(action, resource, context)]
    return mapper


def _dynamodb_batch(action: str) -> Mapper:
    def mapper(params, response, d, result="ok"):
        return [Request(action, d.arn("dynamodb", f"table/{table}")) for table in params.get("RequestItems", [])]
    return mapper


def _instance(d: Deployment, instance_id: str, tag_prefix: str) -> dict[str, str]:
    """The instance's tags as condition keys; none (so a tag condition is UNCHECKED) for an unknown one."""
    tags = d.instance_tags.get(instance_id)
    return {} if tags is None else {f"{tag_prefix}/{k}": v for k, v in tags.items()}


def _ec2_instances(action: str) -> Mapper:
    def mapper(params, response, d, result="ok"):
        return [Request(action, d.arn("ec2", f"instance/{i}"), _instance(d, i, "ec2:ResourceTag"))
                for i in params.get("InstanceIds", [])]
    return mapper


def _star(action: str) -> Mapper:
    return lambda params, response, d, result="ok": [Request(action, "*")]


def _parameter(d: Deployment, name: str) -> str:
    if name.startswith("arn:"):
        return name
    return d.arn("ssm", "parameter" + (name if name.startswith("/") else "/" + name))


def _get_parameter(params, response, d, result="ok"):
    requests = [Request("ssm:GetParameter", _parameter(d, params["Name"]))]
    if params.get("WithDecryption") and (response or {}).get("ParameterType") == "SecureString":
        # The default aws/ssm key: its key id is not known here; the policy scopes it by kms:ViaService.
        requests.append(Request("kms:Decrypt", d.arn("kms", "key/aws-ssm-default-key"),
                                {"kms:ViaService": f"ssm.{d.region}.amazonaws.com"}))
    return requests


def _put_parameter(params, response, d, result="ok"):
    return [Request("ssm:PutParameter", _parameter(d, params["Name"]))]


def _send_command(params, response, d, result="ok"):
    document = params["DocumentName"]
    document_arn = document if document.startswith("arn:") else d.arn("ssm", f"document/{document}")
    requests = [Request("ssm:SendCommand", document_arn)]
    requests += [Request("ssm:SendCommand", d.arn("ec2", f"instance/{i}"), _instance(d, i, "ssm:resourceTag"))
                 for i in params.get("InstanceIds", [])]
    return requests


def _lambda_invoke(params, response, d, result="ok"):
    name = params["FunctionName"]
    if name.startswith("arn:"):
        arn = name
    else:
        arn = d.arn("lambda", f"function:{name}")
    if params.get("Qualifier"):
        arn = f"{arn}:{params['Qualifier']}"
    return [Request("lambda:InvokeFunction", arn)]


def _sqs(action: str) -> Mapper:
    def mapper(params, response, d, result="ok"):
        queue = params.get("QueueName") or urlparse(params["QueueUrl"]).path.rstrip("/").rsplit("/", 1)[-1]
        return [Request(action, d.arn("sqs", queue))]
    return mapper


MAPPERS: dict[tuple[str, str], Mapper] = {
    ("s3", "GetObject"): _s3_read("s3:GetObject", "s3:GetObjectVersion"),
    ("s3", "HeadObject"): _s3_read("s3:GetObject", "s3:GetObjectVersion"),
    ("s3", "PutObject"): _s3_object("s3:PutObject"),
    ("s3", "DeleteObject"): _s3_object("s3:DeleteObject", "s3:DeleteObjectVersion"),
    ("s3", "GetObjectTagging"): _s3_object("s3:GetObjectTagging", "s3:GetObjectVersionTagging"),
    ("s3", "ListObjectsV2"): _s3_list,
    ("s3", "ListObjects"): _s3_list,
    ("dynamodb", "GetItem"): _dynamodb("dynamodb:GetItem"),
    ("dynamodb", "PutItem"): _dynamodb("dynamodb:PutItem"),
    ("dynamodb", "UpdateItem"): _dynamodb("dynamodb:UpdateItem"),
    ("dynamodb", "DeleteItem"): _dynamodb("dynamodb:DeleteItem"),
    ("dynamodb", "Query"): _dynamodb("dynamodb:Query"),
    ("dynamodb", "Scan"): _dynamodb("dynamodb:Scan"),
    ("dynamodb", "BatchGetItem"): _dynamodb_batch("dynamodb:BatchGetItem"),
    ("dynamodb", "BatchWriteItem"): _dynamodb_batch("dynamodb:BatchWriteItem"),
    ("ec2", "DescribeInstances"): _star("ec2:DescribeInstances"),
    ("ec2", "StartInstances"): _ec2_instances("ec2:StartInstances"),
    ("ec2", "StopInstances"): _ec2_instances("ec2:StopInstances"),
    ("ec2", "TerminateInstances"): _ec2_instances("ec2:TerminateInstances"),
    ("ssm", "GetParameter"): _get_parameter,
    ("ssm", "PutParameter"): _put_parameter,
    ("ssm", "SendCommand"): _send_command,
    ("ssm", "GetCommandInvocation"): _star("ssm:GetCommandInvocation"),
    ("ssm", "DescribeInstanceInformation"): _star("ssm:DescribeInstanceInformation"),
    ("ssm", "CancelCommand"): _star("ssm:CancelCommand"),
    ("lambda", "Invoke"): _lambda_invoke,
    ("sqs", "ReceiveMessage"): _sqs("sqs:ReceiveMessage"),
    ("sqs", "DeleteMessage"): _sqs("sqs:DeleteMessage"),
    ("sqs", "DeleteMessageBatch"): _sqs("sqs:DeleteMessage"),
    ("sqs", "ChangeMessageVisibility"): _sqs("sqs:ChangeMessageVisibility"),
    ("sqs", "ChangeMessageVisibilityBatch"): _sqs("sqs:ChangeMessageVisibility"),
    ("sqs", "GetQueueAttributes"): _sqs("sqs:GetQueueAttributes"),
    ("sqs", "SendMessage"): _sqs("sqs:SendMessage"),
    ("sqs", "GetQueueUrl"): _sqs("sqs:GetQueueUrl"),
}


def requests_for(call: Mapping[str, Any], deployment: Deployment) -> list[Request]:
    """The authorizations one recorded call needs; UnmappedCall when the operation has no mapping."""
    mapper = MAPPERS.get((call["service"], call["operation"]))
    if mapper is None:
        raise UnmappedCall(f"no IAM mapping for {call['service']}:{call['operation']} "
                           f"(add one to batchworker/iamcheck/actions.py)")
    params, response = call.get("params", {}), call.get("response", {})
    requests = mapper(params, response, deployment, call.get("result", "ok"))
    principal = call.get("principal", "")
    if principal.startswith("instance:"):
        # A request made with the instance profile's credentials carries the instance's ARN.
        source = deployment.arn("ec2", f"instance/{principal.split(':', 1)[1]}")
        requests = [Request(r.action, r.resource, {**r.context, "ec2:SourceInstanceARN": source}) for r in requests]
    return requests
