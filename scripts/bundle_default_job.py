"""Build the default job package (examples/jobs/digits) for Terraform to ship: no `job deploy` step needed.

Writes <out>/<sha256>.tar.gz, <out>/<sha256>.json and <out>/bundled.json (the registry's own formats,
batchworker/jobpkg/registry.py) and <out>/default-job.json, the index terraform/s3.tf reads. Run it after
the package's weights are in place (`make build`). Same folder, same bytes, same version.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from batchworker.jobpkg.archive import ARCHIVE_SUFFIX, build_archive
from batchworker.jobpkg.config import load_job_config
from batchworker.jobpkg.registry import bundled_record, dumps, version_record
from batchworker.local.paths import BUILD_DIR, DEFAULT_JOB_PACKAGE

INDEX_NAME = "default-job.json"


def bundle(package_dir: Path, out_dir: Path) -> dict:
    config = load_job_config(package_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"*{ARCHIVE_SUFFIX}"):
        stale.unlink()
    archive = build_archive(package_dir, out_dir)
    (out_dir / f"{archive.sha256}.json").write_bytes(dumps(version_record(config, archive)))
    (out_dir / "bundled.json").write_bytes(dumps(bundled_record(config, archive)))
    for stale in out_dir.glob("*.json"):
        if stale.name not in (f"{archive.sha256}.json", "bundled.json", INDEX_NAME):
            stale.unlink()
    index = {"name": config.name, "version": archive.sha256}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", type=Path, default=DEFAULT_JOB_PACKAGE)
    parser.add_argument("--out", type=Path, default=BUILD_DIR / "default-job")
    args = parser.parse_args(argv)
    index = bundle(args.package, args.out)
    print(f"default job {index['name']} version {index['version'][:12]} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
