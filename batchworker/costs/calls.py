"""AWS API calls read from a moto recording: who called which API, counted per component.

The local cloud names each Lambda function and the instance's job in the User-Agent of their calls
(`AWS_SDK_UA_APP_ID`, app/<name>), so a recording of a real local run says how many calls of each API one job
costs each component. Calls without a name are the emulators' own and the client's (the test uploads, the
instance hosts watching moto): counted under "other", never in a component.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from collections.abc import Iterable
from urllib.parse import parse_qs, urlparse

APP_ID = re.compile(r"\bapp/([A-Za-z0-9_.\-]+)")
SCOPE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([^/]+)/aws4_request")
COMPONENTS = ("trigger", "worker", "stop", "reaper", "instance")


def component_of(headers: dict[str, str]) -> str:
    """trigger | worker | stop | reaper | instance, from the app id (`<prefix>-trigger`, `batchworker-instance`)."""
    match = APP_ID.search(headers.get("User-Agent", "") or headers.get("user-agent", ""))
    if not match:
        return "other"
    suffix = match.group(1).rsplit("-", 1)[-1]
    return suffix if suffix in COMPONENTS else "other"


def api_of(entry: dict) -> str:
    """`service:Action` of one recorded request (S3 named by method and shape, the rest by their protocol)."""
    headers = {k.lower(): v for k, v in entry.get("headers", {}).items()}
    scope = SCOPE.search(headers.get("authorization", ""))
    service = scope.group(1) if scope else "unknown"
    target = headers.get("x-amz-target")
    if target:
        return f"{service}:{target.rsplit('.', 1)[-1]}"
    url = urlparse(entry.get("url", ""))
    query = parse_qs(url.query, keep_blank_values=True)
    if "Action" in query:
        return f"{service}:{query['Action'][0]}"
    if service == "s3":
        return f"s3:{_s3_operation(entry.get('method', ''), url.path, query)}"
    body = entry.get("body") or ""
    if entry.get("body_encoded"):
        body = base64.b64decode(body).decode("utf-8", errors="replace")
    if "Action=" in body:
        return f"{service}:{parse_qs(body).get('Action', ['?'])[0]}"
    return f"{service}:{entry.get('method', '?')}"


def _s3_operation(method: str, path: str, query: dict) -> str:
    has_key = len([part for part in path.split("/") if part]) >= 2
    if method == "GET":
        return "GetObject" if has_key else "ListObjects"
    if method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if method == "PUT":
        return "PutObject" if has_key else "PutBucket"
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    return method.title()


def count_calls(lines: Iterable[str]) -> dict[str, Counter]:
    """{component: Counter({"service:Action": calls})} of a moto recording (one JSON request per line)."""
    counts: dict[str, Counter] = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        entry = json.loads(line)
        headers = {k: v for k, v in entry.get("headers", {}).items()}
        counts.setdefault(component_of(headers), Counter())[api_of(entry)] += 1
    return counts
