"""EventBridge `rate(...)` schedules for the local Lambda runtime, with an optional faster clock."""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

_RATE = re.compile(r"^rate\(\s*(\d+)\s+(second|minute|hour|day)s?\s*\)$")
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def parse_rate_seconds(expression: str) -> int | None:
    """Seconds between firings of `rate(N unit)`; None for anything else (cron is not supported locally).

    `seconds` is accepted for local tests although EventBridge itself only takes minutes and up.
    """
    match = _RATE.match(expression.strip())
    if match is None:
        return None
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True)
class ScheduledTarget:
    """One Lambda target of one scheduled rule."""

    rule_name: str
    rule_arn: str
    function_name: str
    period_seconds: int
    constant_input: str | None  # the target's Input, which replaces the event when set


def scheduled_event(rule_arn: str, now: datetime) -> dict[str, Any]:
    """The event EventBridge sends for a scheduled rule."""
    _, _, _, region, account, _ = rule_arn.split(":", 5)
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": account,
        "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [rule_arn],
        "detail": {},
    }


def discover_scheduled_targets(events: Any) -> list[ScheduledTarget]:
    """Enabled `rate(...)` rules on the default bus and their Lambda function targets."""
    targets = []
    for page in events.get_paginator("list_rules").paginate():
        for rule in page["Rules"]:
            expression = rule.get("ScheduleExpression")
            if not expression or rule.get("State") != "ENABLED":
                continue
            period = parse_rate_seconds(expression)
            if period is None:
                logger.warning(
                    "rule %s: schedule %r is not run locally (only rate(...))", rule["Name"], expression
                )
                continue
            for target in events.list_targets_by_rule(Rule=rule["Name"])["Targets"]:
                if ":lambda:" not in target["Arn"]:
                    continue
                if "InputPath" in target or "InputTransformer" in target:
                    logger.warning(
                        "rule %s: InputPath/InputTransformer are not applied locally", rule["Name"]
                    )
                targets.append(
                    ScheduledTarget(
                        rule_name=rule["Name"],
                        rule_arn=rule["Arn"],
                        function_name=target["Arn"].split(":")[6],
                        period_seconds=period,
                        constant_input=target.get("Input"),
                    )
                )
    return targets


class Scheduler(threading.Thread):
    """Fires one scheduled target every period/speedup seconds (the first time one period after start)."""

    def __init__(
        self,
        target: ScheduledTarget,
        speedup: float,
        invoke_async: Callable[[str, str], None],
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"schedule-{target.rule_name}-{target.function_name}", daemon=True)
        self.target = target
        self._interval_seconds = target.period_seconds / speedup
        self._invoke_async = invoke_async
        self._stopping = stop

    def run(self) -> None:
        while not self._stopping.wait(self._interval_seconds):
            event = self.target.constant_input or json.dumps(
                scheduled_event(self.target.rule_arn, datetime.now(UTC))
            )
            logger.debug("rule %s fires %s", self.target.rule_name, self.target.function_name)
            self._invoke_async(self.target.function_name, event)
