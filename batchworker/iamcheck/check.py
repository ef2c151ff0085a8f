"""`make iam-check`: every recorded AWS call allowed by its role, every grant used or explained, nothing forbidden.

Inputs: the call log the integration tests record (build/iam/calls, batchworker/local/call_log.py) and
the Terraform state of the same local cloud (build/iam/terraform.tfstate), whose rendered policies are the
ones terraform/iam.tf produces. Prints per role: calls recorded, distinct actions, denied calls, calls
whose conditions could not be checked, grants never exercised (with their reason from iam.tf), forbidden
actions allowed, parliament findings. Exit status 1 when a must-be-0 figure is not 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchworker.iamcheck import forbidden
from batchworker.iamcheck.actions import UnmappedCall, requests_for
from batchworker.iamcheck.evaluate import ALLOWED, DENIED, Match, Request, evaluate, statement_matches
from batchworker.iamcheck.markers import Markers, read_markers, reason_for
from batchworker.iamcheck.state import AppliedState, Role, load_state, role_kind_of
from batchworker.local.paths import BUILD_DIR, TERRAFORM_DIR

CALL_LOG_DIR = BUILD_DIR / "iam" / "calls"
STATE_COPY = BUILD_DIR / "iam" / "terraform.tfstate"
ROLE_ORDER = ("trigger", "worker", "stop", "reaper", "instance", "client", "operator")

# Parliament findings accepted on purpose: (issue, text in its detail) -> reason.
PARLIAMENT_SUPPRESSIONS: dict[tuple[str, str], str] = {
    ("UNKNOWN_CONDITION_FOR_ACTION", "Unknown condition ec2:SourceInstanceARN for action"):
        "ec2:SourceInstanceARN is a global condition key of requests signed with an instance profile's "
        "credentials (IAM User Guide, global condition context keys); parliament's per-action database "
        "does not list global keys",
}


@dataclass
class RoleReport:
    role: Role
    calls: int = 0
    actions: set[str] = field(default_factory=set)
    denied: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    unexercised: list[tuple[str, str | None]] = field(default_factory=list)  # (grant, reason or None)
    forbidden_allowed: list[str] = field(default_factory=list)
    forbidden_checked: int = 0
    parliament: list[str] = field(default_factory=list)
    # "# unexercised" on a grant some call used: printed, not a failure (some paths run only in some runs).
    stale_markers: list[str] = field(default_factory=list)

    @property
    def unexplained(self) -> list[str]:
        return [grant for grant, reason in self.unexercised if reason is None]

    @property
    def failures(self) -> list[str]:
        return [*(f"denied: {d}" for d in self.denied), *(f"not checked: {u}" for u in self.unchecked),
                *(f"granted but never exercised and no '# unexercised: reason' in iam.tf: {g}"
                  for g in self.unexplained),
                *(f"forbidden but allowed: {f}" for f in self.forbidden_allowed),
                *(f"parliament: {p}" for p in self.parliament)]


@dataclass
class CheckResult:
    reports: dict[str, RoleReport]
    errors: list[str]  # calls that could not be attributed or mapped
    requests: dict[str, list[Request]] = field(default_factory=dict)  # distinct requests per role

    @property
    def ok(self) -> bool:
        return not self.errors and not any(r.failures for r in self.reports.values())


def load_calls(log_dir: Path) -> list[dict[str, Any]]:
    calls = []
    for path in sorted(Path(log_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                calls.append(json.loads(line))
    return calls


def _describe(request: Request) -> str:
    context = {k: v for k, v in request.context.items() if v is not None}
    return f"{request.action} on {request.resource}" + (f" {json.dumps(context, sort_keys=True)}" if context else "")


def check(calls: Iterable[Mapping[str, Any]], applied: AppliedState, markers: Markers,
          lint: bool = True) -> CheckResult:
    reports = {kind: RoleReport(applied.roles[kind]) for kind in ROLE_ORDER if kind in applied.roles}
    errors: list[str] = []
    # Each distinct request once per role, with the first call that made it (for the message).
    needed: dict[str, dict[Request, str]] = {kind: {} for kind in reports}
    for call in calls:
        kind = role_kind_of(call["principal"], applied)
        if kind is None:
            if not call["principal"].startswith("cli:"):
                errors.append(f"call by unknown principal {call['principal']}: {call['service']}:{call['operation']}")
            continue
        if kind not in reports:
            errors.append(f"{call['principal']} acts as {kind}, which has no policy in the state")
            continue
        reports[kind].calls += 1
        try:
            requests = requests_for(call, applied.deployment)
        except (UnmappedCall, KeyError) as exc:
            errors.append(f"{kind} ({call['principal']}): {exc}")
            continue
        for request in requests:
            needed[kind].setdefault(_hashable(request), f"{call['operation']} by {call['principal']}")
    for kind, report in reports.items():
        policies = list(report.role.documents.values())
        for request, origin in needed[kind].items():
            report.actions.add(request.action)
            decision = evaluate(policies, request)
            where = f"{report.role.name}: {_describe(request)} ({origin})"
            if decision.result == DENIED:
                report.denied.append(where)
            elif decision.result != ALLOWED:
                report.unchecked.append(f"{where}: {'; '.join(decision.unchecked)}")
        report.unexercised, report.stale_markers = _unexercised(report.role, list(needed[kind]), markers)
        for item in forbidden.requests_for_role(kind, applied):
            report.forbidden_checked += 1
            decision = evaluate(policies, item.request)
            if decision.result != DENIED:
                report.forbidden_allowed.append(
                    f"{report.role.name}: {_describe(item.request)} ({item.why}; {decision.result} by "
                    f"{', '.join(decision.statements) or '?'})")
        if lint:
            report.parliament = parliament_findings(report.role)
    return CheckResult(reports, sorted(set(errors)), {kind: list(n) for kind, n in needed.items()})


def _hashable(request: Request) -> Request:
    context = {k: tuple(v) if isinstance(v, list) else v for k, v in request.context.items()}
    return Request(request.action, request.resource, _FrozenDict(context))


class _FrozenDict(dict):
    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda item: item[0])))


def _unexercised(role: Role, requests: list[Request],
                 markers: Markers) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Grants (statement, action) no request uses, with their reason; and reasons on grants that are used."""
    unused, stale = [], []
    for document, policy in role.documents.items():
        for statement in policy.get("Statement", []):
            if statement.get("Effect") != "Allow":
                continue
            sid = statement.get("Sid", "")
            for action in _list(statement.get("Action", [])):
                probe = {**statement, "Action": [action], "Condition": {}}
                grant = f"{document}.{sid or '?'} {action} on {', '.join(_list(statement.get('Resource', '*')))}"
                reason = reason_for(markers, document, sid, action)
                if any(statement_matches(probe, r)[0] is not Match.NO for r in requests):
                    if reason is not None:
                        stale.append(grant)
                    continue
                unused.append((grant, reason))
    return unused, stale


def _list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def parliament_findings(role: Role) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parliament imports pkg_resources, which warns on import
        from parliament import analyze_policy_string
    findings = []
    for document, policy in role.documents.items():
        for finding in analyze_policy_string(json.dumps(policy)).findings:
            detail = json.dumps(finding.detail, default=str)
            if any(issue == finding.issue and text in detail for issue, text in PARLIAMENT_SUPPRESSIONS):
                continue
            findings.append(f"{document}: {finding.issue} {detail}")
    return findings


def without_statement(applied: AppliedState, kind: str, sid: str) -> AppliedState:
    """A copy of `applied` whose role `kind` lacks the statement `sid` (what removing it from iam.tf renders)."""
    changed = copy.deepcopy(applied)
    for policy in changed.roles[kind].documents.values():
        policy["Statement"] = [s for s in policy["Statement"] if s.get("Sid") != sid]
    return changed


def render(result: CheckResult) -> str:
    header = ("role", "calls", "actions", "denied", "not checked", "unexercised (explained)", "forbidden allowed (of)",
              "parliament")
    rows = [header]
    for kind, r in result.reports.items():
        rows.append((f"{kind} ({r.role.name})", str(r.calls), str(len(r.actions)), str(len(r.denied)),
                     str(len(r.unchecked)), f"{len(r.unexercised)} ({len(r.unexercised) - len(r.unexplained)})",
                     f"{len(r.forbidden_allowed)} ({r.forbidden_checked})", str(len(r.parliament))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    for kind, r in result.reports.items():
        for grant, reason in r.unexercised:
            if reason:
                lines.append(f"  {kind}: unexercised {grant}: {reason}")
        for grant in r.stale_markers:
            lines.append(f"  {kind}: marked unexercised but used in this run (fine when that path is rare): {grant}")
    problems = [f"FAIL {kind}: {failure}" for kind, r in result.reports.items() for failure in r.failures]
    problems += [f"FAIL {error}" for error in result.errors]
    return "\n".join(lines + problems + ["iam-check: " + ("ok" if result.ok else f"{len(problems)} problem(s)")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=Path, default=CALL_LOG_DIR, help="call log folder (default %(default)s)")
    parser.add_argument("--state", type=Path, default=STATE_COPY, help="applied terraform.tfstate (default %(default)s)")
    parser.add_argument("--iam-tf", type=Path, default=TERRAFORM_DIR / "iam.tf")
    args = parser.parse_args(argv)
    if not args.state.is_file() or not args.calls.is_dir():
        print(f"iam-check: no recorded calls ({args.calls}) or state ({args.state}): run the integration tests "
              "first (`make test`, or `.venv/bin/python -m pytest -m integration tests/integration`)", file=sys.stderr)
        return 2
    calls = load_calls(args.calls)
    if not calls:
        print(f"iam-check: {args.calls} holds no calls", file=sys.stderr)
        return 2
    result = check(calls, load_state(args.state), read_markers(args.iam_tf))
    print(render(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
