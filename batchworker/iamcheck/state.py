"""The policies Terraform rendered, and who uses which, read from an applied state (terraform.tfstate v4)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchworker.iamcheck.actions import Deployment

# CLI commands a client runs (client_policy_json); every other AWS-calling command is an operator's.
CLIENT_COMMANDS = frozenset({"submit", "status", "results", "logs"})
# Commands that manage the local cloud itself: not a deployment's IAM.
LOCAL_COMMANDS = frozenset({"local"})


@dataclass
class Role:
    """A principal's identity policies: `documents` maps the aws_iam_policy_document's name to its JSON."""

    kind: str  # trigger, worker, stop, reaper, instance, client, operator
    name: str  # IAM role name, or the Terraform output for client/operator
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class AppliedState:
    deployment: Deployment
    roles: dict[str, Role]  # by kind
    principals: dict[str, str]  # recorded principal -> role kind
    names: Mapping[str, str]  # name_prefix, buckets, tables, document, pool tag


def _instances(state: dict, mode: str, type_: str) -> list[tuple[str, Any, dict]]:
    return [(r["name"], i.get("index_key"), i["attributes"]) for r in state.get("resources", [])
            if r["mode"] == mode and r["type"] == type_ for i in r["instances"]]


def _canonical(document: str | dict) -> str:
    return json.dumps(json.loads(document) if isinstance(document, str) else document, sort_keys=True)


def load_state(path: Path) -> AppliedState:
    state = json.loads(Path(path).read_text())
    outputs = {name: value["value"] for name, value in state.get("outputs", {}).items()}
    documents = {_canonical(a["json"]): name for name, _, a in _instances(state, "data", "aws_iam_policy_document")}
    account = next(a["account_id"] for _, _, a in _instances(state, "data", "aws_caller_identity"))
    partition = next((a["partition"] for _, _, a in _instances(state, "data", "aws_partition")), "aws")
    instances = _instances(state, "managed", "aws_instance")
    deployment = Deployment(partition, outputs["region"], account,
                            {a["id"]: dict(a.get("tags_all") or a.get("tags") or {}) for _, _, a in instances})

    role_arns = {a["arn"]: a["name"] for _, _, a in _instances(state, "managed", "aws_iam_role")}
    role_documents: dict[str, dict[str, dict]] = {}
    for _, _, attributes in _instances(state, "managed", "aws_iam_role_policy"):
        document = json.loads(attributes["policy"])
        name = documents.get(_canonical(document), f"inline:{attributes['name']}")
        role_documents.setdefault(attributes["role"], {})[name] = document
    for _, _, attributes in _instances(state, "managed", "aws_iam_role_policy_attachment"):
        # Managed policies are not read from the state: the check would be incomplete, so say so.
        raise ValueError(f"role {attributes['role']} has an attached managed policy {attributes['policy_arn']}: "
                         "the IAM check reads inline policies only")

    roles: dict[str, Role] = {}
    principals: dict[str, str] = {}
    for _, kind, attributes in _instances(state, "managed", "aws_lambda_function"):
        role_name = role_arns.get(attributes["role"], attributes["role"].rsplit("/", 1)[-1])
        roles[kind] = Role(kind, role_name, role_documents.get(role_name, {}))
        principals[f"lambda:{attributes['function_name']}"] = kind
    profiles = {a["name"]: a["role"] for _, _, a in _instances(state, "managed", "aws_iam_instance_profile")}
    for _, _, attributes in instances:
        role_name = profiles.get(attributes.get("iam_instance_profile") or "", "")
        roles.setdefault("instance", Role("instance", role_name, role_documents.get(role_name, {})))
        principals[f"instance:{attributes['id']}"] = "instance"
    for kind in ("client", "operator"):
        output = f"{kind}_policy_json"
        if output in outputs:
            document = json.loads(outputs[output])
            roles[kind] = Role(kind, f"output {output}", {documents.get(_canonical(document), output): document})

    names = {
        "name_prefix": outputs.get("pool_tag", ""),
        "pool_tag": outputs.get("pool_tag", ""),
        "input_bucket": outputs.get("input_bucket", ""),
        "output_bucket": outputs.get("output_bucket", ""),
        "artifacts_bucket": outputs.get("artifacts_bucket", ""),
        "jobs_table": outputs.get("jobs_table", ""),
        "instance_events_table": outputs.get("instance_events_table", ""),
        "parameter_prefix": outputs.get("parameter_prefix", ""),
        "ssm_document": outputs.get("ssm_document_name", ""),
        "worker_function": outputs.get("worker_function_name", ""),
    }
    return AppliedState(deployment, roles, principals, names)


def role_kind_of(principal: str, applied: AppliedState) -> str | None:
    """The role kind a recorded principal acts as; None for calls outside the deployment's IAM."""
    if principal.startswith("cli:"):
        command = principal.split(":", 1)[1]
        if command in LOCAL_COMMANDS:
            return None
        return "client" if command in CLIENT_COMMANDS else "operator"
    return applied.principals.get(principal)
