"""Reasons for grants no recorded call exercises, read from `# unexercised ...:` comments in terraform/iam.tf.

A statement's comment block may carry `# unexercised: <reason>` (every action of the statement) or
`# unexercised (s3:ListBucket, ...): <reason>` (those actions). Statements are identified by their policy
document (data "aws_iam_policy_document" "<name>") and Sid (a dynamic block's Sid is its for_each value,
or the literal start of a templated Sid).
"""

from __future__ import annotations

import re
from pathlib import Path

_DOCUMENT = re.compile(r'^data\s+"aws_iam_policy_document"\s+"(\w+)"\s*\{', re.M)
_TOP_LEVEL = re.compile(r"^\S", re.M)
_STATEMENT = re.compile(r'^  (?:statement|dynamic\s+"statement")\s*\{', re.M)
_MARKER = re.compile(r"#\s*unexercised(?:\s*\(([^)]*)\))?\s*:\s*(.+)")
_SID = re.compile(r'sid\s*=\s*"([A-Za-z0-9]+)(\$\{)?')
_FOR_EACH_SID = re.compile(r'for_each\s*=.*\[\s*"([A-Za-z0-9]+)"\s*\]')

# (document, sid, sid is a prefix of templated Sids) -> {action or "*": reason}
Markers = dict[tuple[str, str, bool], dict[str, str]]


def statements_of(text: str) -> list[tuple[str, str, bool, list[str], str]]:
    """(document, sid, sid_is_prefix, comment lines above it, body) for every statement of every document."""
    found = []
    for doc in _DOCUMENT.finditer(text):
        start = doc.end()
        end = next((m.start() for m in _TOP_LEVEL.finditer(text, start) if text[m.start()] != "}"), len(text))
        block = text[start:end]
        starts = [m.start() for m in _STATEMENT.finditer(block)]
        for index, position in enumerate(starts):
            body = block[position:starts[index + 1] if index + 1 < len(starts) else len(block)]
            before = block[:position].rstrip("\n").split("\n")
            comments = []
            for line in reversed(before):
                if not line.strip().startswith("#"):
                    break
                comments.insert(0, line.strip())
            sid_match = _FOR_EACH_SID.search(body) or _SID.search(body)
            sid = sid_match.group(1) if sid_match else ""
            is_prefix = bool(sid_match and sid_match.re is _SID and sid_match.group(2))
            found.append((doc.group(1), sid, is_prefix, comments, body))
    return found


def read_markers(iam_tf: Path) -> Markers:
    markers: Markers = {}
    for document, sid, is_prefix, comments, _ in statements_of(Path(iam_tf).read_text()):
        for line in comments:
            match = _MARKER.search(line)
            if match:
                actions = [a.strip() for a in (match.group(1) or "*").split(",") if a.strip()]
                for action in actions:
                    markers.setdefault((document, sid, is_prefix), {})[action] = match.group(2).strip()
    return markers


def reason_for(markers: Markers, document: str, sid: str, action: str) -> str | None:
    for (marked_document, marked_sid, is_prefix), reasons in markers.items():
        if marked_document != document or not (sid == marked_sid or (is_prefix and sid.startswith(marked_sid))):
            continue
        for marked_action, reason in reasons.items():
            if marked_action == "*" or marked_action.lower() == action.lower():
                return reason
    return None
