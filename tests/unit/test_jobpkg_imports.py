"""The instance ships batchworker.jobpkg's config and archive modules in its wheel: pin what they import."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Exactly what the job wheel must carry besides worker/ (scripts/build_job_package.py).
SHIPPED = {"batchworker", "batchworker.errors", "batchworker.jobpkg", "batchworker.jobpkg.archive",
           "batchworker.jobpkg.config", "batchworker.jobpkg.errors"}


def test_config_and_archive_import_only_the_stdlib_and_each_other():
    code = (
        "import sys, json; import batchworker.jobpkg; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('batchworker', 'boto3', 'botocore', 'torch', 'aws_lambda_powertools'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert set(json.loads(result.stdout)) == SHIPPED
