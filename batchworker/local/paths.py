"""Where the local cloud keeps its files, and where the repository's parts are."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO_ROOT / "terraform"
BUILD_DIR = REPO_ROOT / "build"
LAMBDA_BUILD_DIR = BUILD_DIR / "lambdas"
MODEL_PATH = BUILD_DIR / "model" / "digits-cnn.pt"
SCRIPTS_DIR = REPO_ROOT / "scripts"
DEFAULT_JOB_PACKAGE = REPO_ROOT / "examples" / "jobs" / "digits"  # Terraform default_job ("digits")
VENV_BIN = Path(sys.executable).parent


def local_dir() -> Path:
    """The local cloud's state folder: $BATCHWORKER_LOCAL_DIR, else `.local-cloud/` in the repository."""
    return Path(os.environ.get("BATCHWORKER_LOCAL_DIR") or REPO_ROOT / ".local-cloud").resolve()
