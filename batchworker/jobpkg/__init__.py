"""Job packages: the job.toml schema, the content-addressed archive and the registry in the artifacts bucket.

Pure Python (no torch, no Powertools): the Lambdas, the CLI and the instance (worker/) all import it.
"""

from batchworker.jobpkg.archive import ArchiveInfo, build_archive, extract_archive
from batchworker.jobpkg.config import JobConfig, ParamSpec, load_job_config, parse_job_config
from batchworker.jobpkg.errors import (
    DeployConflict,
    InvalidJobConfig,
    InvalidParams,
    JobPackageError,
    PackageNotFound,
    UnsafeArchive,
)

__all__ = [
    "ArchiveInfo",
    "DeployConflict",
    "InvalidJobConfig",
    "InvalidParams",
    "JobConfig",
    "JobPackageError",
    "PackageNotFound",
    "ParamSpec",
    "UnsafeArchive",
    "build_archive",
    "extract_archive",
    "load_job_config",
    "parse_job_config",
]
