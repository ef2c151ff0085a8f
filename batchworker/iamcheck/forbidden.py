"""What each role must NOT be able to do, as concrete requests the check expects to be denied."""

from __future__ import annotations

from dataclasses import dataclass

from batchworker.iamcheck.evaluate import Request
from batchworker.iamcheck.state import AppliedState

ALL = ("trigger", "worker", "stop", "reaper", "instance", "client", "operator")


@dataclass(frozen=True)
class Forbidden:
    request: Request
    why: str


def requests_for_role(kind: str, applied: AppliedState) -> list[Forbidden]:
    d, n = applied.deployment, applied.names
    other = "other-prefix"
    instance_id, tags = next(iter(d.instance_tags.items()), ("i-00000000000000000", {}))
    instance_arn = d.arn("ec2", f"instance/{instance_id}")
    pool_tags = {f"ec2:ResourceTag/{k}": v for k, v in tags.items()}
    ssm_tags = {f"ssm:resourceTag/{k}": v for k, v in tags.items()}
    foreign_instance = {"ec2:ResourceTag/batchworker:pool": other}
    jobs_table = d.arn("dynamodb", f"table/{n['jobs_table']}")

    def s3(bucket: str, key: str | None = None) -> str:
        return d.arn("s3", bucket if key is None else f"{bucket}/{key}", region=False, account=False)

    rules: list[tuple[tuple[str, ...], str, str, dict, str]] = [
        # (roles, action, resource, condition context, why)
        (ALL, "ec2:TerminateInstances", instance_arn, pool_tags, "no role terminates the pool's instances"),
        (ALL, "ec2:StartInstances", d.arn("ec2", "instance/i-0ther"), foreign_instance,
         "instances of another pool are out of reach"),
        (ALL, "ec2:StopInstances", d.arn("ec2", "instance/i-0ther"), foreign_instance,
         "instances of another pool are out of reach"),
        (ALL, "ec2:RunInstances", d.arn("ec2", "instance/*"), {}, "no role launches instances"),
        (ALL, "iam:PassRole", d.arn("iam", "role/any", region=False), {}, "no role hands out roles"),
        (ALL, "iam:CreateRole", d.arn("iam", "role/any", region=False), {}, "no role creates roles"),
        (ALL, "iam:PutRolePolicy", d.arn("iam", "role/any", region=False), {}, "no role changes policies"),
        (ALL, "s3:GetObject", s3(f"{other}-input-{d.account}", "x"), {}, "buckets of another prefix"),
        (ALL, "s3:PutObject", s3(f"{other}-output-{d.account}", "jobs/x"), {}, "buckets of another prefix"),
        (ALL, "s3:DeleteObject", s3(n["input_bucket"], "x"), {}, "no role deletes inputs"),
        (ALL, "s3:DeleteObject", s3(n["output_bucket"], "jobs/x/manifest.json"), {}, "no role deletes results"),
        (ALL, "s3:PutBucketPolicy", s3(n["output_bucket"]), {}, "no role changes bucket policies"),
        (ALL, "dynamodb:DeleteTable", jobs_table, {}, "no role deletes tables"),
        (ALL, "dynamodb:GetItem", d.arn("dynamodb", f"table/{other}-jobs"), {}, "tables of another prefix"),
        (ALL, "ssm:GetParameter", d.arn("ssm", f"parameter/{other}/ssh/private-key"), {},
         "parameters of another prefix"),
        (ALL, "lambda:InvokeFunction", d.arn("lambda", f"function:{other}-worker"), {},
         "functions of another prefix"),
        (ALL, "lambda:UpdateFunctionCode", d.arn("lambda", f"function:{n['worker_function']}"), {},
         "no role changes code"),
        (("instance", "client", "operator", "stop", "reaper"), "ec2:StartInstances", instance_arn, pool_tags,
         "only the trigger and worker start instances"),
        (("instance", "client", "trigger", "worker"), "ec2:StopInstances", instance_arn, pool_tags,
         "only stop and reaper stop instances"),
        (("instance", "client", "operator", "trigger", "stop", "reaper"), "ssm:SendCommand",
         d.arn("ssm", f"document/{n['ssm_document'] or 'run-job'}"), {}, "only the worker sends commands"),
        (("instance", "client", "operator", "trigger", "stop", "reaper"), "ssm:SendCommand", instance_arn, ssm_tags,
         "only the worker sends commands"),
        (("instance",), "s3:PutObject", s3(n["output_bucket"], "other/x"), {},
         "the instance writes only under jobs/ and ssm-output/"),
        (("instance",), "s3:PutObject", s3(n["output_bucket"], "models/x"), {},
         "the instance writes only under jobs/ and ssm-output/"),
        (("instance",), "s3:PutObject", s3(n["input_bucket"], "x"), {}, "the instance never writes inputs"),
        (("instance",), "s3:PutObject", s3(n["artifacts_bucket"], "job-packages/digits/current.json"), {},
         "the instance never replaces a job package or its pointer"),
        (("instance",), "dynamodb:GetItem", jobs_table, {}, "the instance cannot read other jobs"),
        (("instance",), "dynamodb:PutItem", jobs_table, {"dynamodb:Attributes": ["job_id", "status"]},
         "the instance cannot create jobs"),
        (("instance",), "dynamodb:UpdateItem", jobs_table,
         {"dynamodb:Attributes": ["job_id", "instance_id"], "dynamodb:ReturnValues": "NONE"},
         "the instance renews its lease only, it cannot move a job to another instance"),
        (("instance",), "ssm:GetParameter", d.arn("ssm", f"parameter{n['parameter_prefix']}/ssh/private-key"), {},
         "the instance cannot read the worker's login key"),
        (("instance",), "ssm:PutParameter", d.arn("ssm", f"parameter{n['parameter_prefix']}/job-package"), {},
         "the instance cannot repoint the job package"),
        (("client",), "s3:PutObject", s3(n["output_bucket"], "jobs/x/manifest.json"), {}, "clients cannot forge results"),
        (("client",), "dynamodb:UpdateItem", jobs_table, {"dynamodb:Attributes": ["job_id", "status"]},
         "clients cannot change a job's status"),
        (("client",), "lambda:InvokeFunction", d.arn("lambda", f"function:{n['worker_function']}"), {},
         "clients cannot dispatch jobs by hand"),
    ]
    return [Forbidden(Request(action, resource, context), why)
            for roles, action, resource, context, why in rules if kind in roles]
