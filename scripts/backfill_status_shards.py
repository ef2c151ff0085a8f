"""Upgrade: give the jobs written before the sharded status index their `status_shard` attribute.

Run once after `terraform apply` replaces `status-index` with `status-shard-index` (terraform/README.md):
until then the older jobs are missing from the index (the dashboard's lists, the reaper's active set).

    python scripts/backfill_status_shards.py --table <name_prefix>-jobs
"""

from __future__ import annotations

import argparse

from batchworker.jobs import JobStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="the jobs table, <name_prefix>-jobs")
    args = parser.parse_args()
    print(f"{JobStore(args.table).backfill_status_shards()} job(s) given their status_shard")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
