"""IAM policy evaluation for one request: explicit deny, then allow; conditions for the operators we use.

A condition whose key the request does not model, or whose operator is not implemented here, makes the
answer UNCHECKED (never a silent allow). Follows the IAM policy evaluation logic for identity policies
in one account: an explicit Deny wins, else any Allow whose Action, Resource and every condition match.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

ALLOWED, DENIED, UNCHECKED = "allowed", "denied", "unchecked"


class Match(Enum):
    YES = 1
    NO = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Request:
    """One IAM authorization a call needs. `context`: condition keys modelled for it (None: known absent)."""

    action: str
    resource: str
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    result: str
    statements: tuple[str, ...] = ()  # the Sids that allowed (or denied) it
    unchecked: tuple[str, ...] = ()  # why the answer is not known


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


def _wildcard(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    """IAM wildcards: * any run, ? one character; everything else literal."""
    return _compiled(pattern, ignore_case).fullmatch(value) is not None


def action_matches(patterns: Sequence[str], action: str) -> bool:
    return any(_wildcard(p, action, ignore_case=True) for p in patterns)


def resource_matches(patterns: Sequence[str], resource: str) -> bool:
    return any(_wildcard(p, resource) for p in patterns)


def _lookup(context: Mapping[str, Any], key: str) -> tuple[bool, list[str] | None]:
    """(modelled, values): condition key names compare case-insensitively."""
    for name, value in context.items():
        if name.lower() == key.lower():
            return True, None if value is None else [str(v) for v in _as_list(value)]
    return False, None


_STRING_OPERATORS = {
    "StringEquals": lambda want, got: want == got,
    "StringNotEquals": lambda want, got: want != got,
    "StringEqualsIgnoreCase": lambda want, got: want.lower() == got.lower(),
    "StringLike": lambda want, got: _wildcard(want, got),
    "StringNotLike": lambda want, got: not _wildcard(want, got),
    "ArnEquals": lambda want, got: want == got,
    "ArnLike": lambda want, got: _wildcard(want, got),
    "ArnNotEquals": lambda want, got: want != got,
    "ArnNotLike": lambda want, got: not _wildcard(want, got),
    "Bool": lambda want, got: want.lower() == got.lower(),
}
_NEGATED = {"StringNotEquals", "StringNotLike", "ArnNotEquals", "ArnNotLike"}


def condition_matches(operator: str, key: str, wanted: Any, context: Mapping[str, Any]) -> tuple[Match, str]:
    qualifier, _, base = operator.rpartition(":")
    if_exists = base.endswith("IfExists")
    base = base.removesuffix("IfExists")
    wanted_values = [str(w).lower() if isinstance(w, bool) else str(w) for w in _as_list(wanted)]
    modelled, values = _lookup(context, key)
    if not modelled:
        return Match.UNKNOWN, f"condition key {key} is not modelled for this request"
    if base == "Null":
        is_null = values is None or values == []
        return (Match.YES if str(wanted_values[0]).lower() == str(is_null).lower() else Match.NO), ""
    if base not in _STRING_OPERATORS:
        return Match.UNKNOWN, f"condition operator {operator} is not implemented by the checker"
    compare = _STRING_OPERATORS[base]
    if values is None:  # the key is absent from the request
        if if_exists or qualifier == "ForAllValues":
            return Match.YES, ""
        return Match.NO, ""
    negated = base in _NEGATED

    def one(value: str) -> bool:
        hits = [compare(w, value) for w in wanted_values]
        return all(hits) if negated else any(hits)

    if qualifier == "ForAllValues":
        return (Match.YES if all(one(v) for v in values) else Match.NO), ""
    if qualifier == "ForAnyValue" or len(values) == 1:
        return (Match.YES if any(one(v) for v in values) else Match.NO), ""
    return Match.UNKNOWN, f"{key} has several values and {operator} names no set operator"


def statement_matches(statement: Mapping[str, Any], request: Request) -> tuple[Match, list[str]]:
    if "Action" in statement:
        if not action_matches(_as_list(statement["Action"]), request.action):
            return Match.NO, []
    elif action_matches(_as_list(statement.get("NotAction", [])), request.action):
        return Match.NO, []
    if "Resource" in statement:
        if not resource_matches(_as_list(statement["Resource"]), request.resource):
            return Match.NO, []
    elif resource_matches(_as_list(statement.get("NotResource", [])), request.resource):
        return Match.NO, []
    if "Principal" in statement or "NotPrincipal" in statement:
        return Match.UNKNOWN, ["a Principal in an identity policy"]
    unknown = []
    for operator, pairs in (statement.get("Condition") or {}).items():
        for key, wanted in pairs.items():
            match, why = condition_matches(operator, key, wanted, request.context)
            if match is Match.NO:
                return Match.NO, []
            if match is Match.UNKNOWN:
                unknown.append(why)
    return (Match.UNKNOWN, unknown) if unknown else (Match.YES, [])


def evaluate(policies: Sequence[Mapping[str, Any]], request: Request) -> Decision:
    statements = [s for policy in policies for s in _as_list(policy.get("Statement", []))]
    allowed, maybe, why = [], [], []
    for statement in statements:
        match, unknown = statement_matches(statement, request)
        sid = statement.get("Sid", "")
        if statement.get("Effect") == "Deny":
            if match is Match.YES:
                return Decision(DENIED, (sid,))
            if match is Match.UNKNOWN:
                maybe.append(sid)
                why += unknown
        elif match is Match.YES:
            allowed.append(sid)
        elif match is Match.UNKNOWN:
            maybe.append(sid)
            why += unknown
    if allowed and not any(s.get("Effect") == "Deny" and s.get("Sid", "") in maybe for s in statements):
        return Decision(ALLOWED, tuple(allowed))
    if maybe:
        return Decision(UNCHECKED, tuple(maybe), tuple(dict.fromkeys(why)))
    return Decision(DENIED)
