"""Which job package an upload runs, with which parameters: decided in the trigger, before any instance starts.

A key `<name>/...` runs the package deployed as `<name>`; every other key runs the default job (with no
default_job, it is refused). The upload's extension must be one the package accepts and its
`param-<name>` metadata must fit the package's [params].
"""

from __future__ import annotations

import difflib
import email.charset
import email.errors
import email.header
from collections.abc import Mapping
from dataclasses import dataclass, field

from batchworker.errors import PermanentError
from batchworker.jobpkg.config import NAME_PATTERN
from batchworker.jobpkg.errors import InvalidParams
from batchworker.jobpkg.registry import PackageRef, PackageRegistry

PARAM_METADATA_PREFIX = "param-"


class UploadRefused(PermanentError):
    """The upload cannot run: its message (for the failed manifest) says what to change."""


@dataclass(frozen=True)
class Route:
    package: PackageRef
    params: dict
    by_prefix: bool  # the key's first folder named the package (else the default job took it)


@dataclass
class PackageLookup:
    """Reads each package pointer once per trigger batch: one burst of uploads costs one read per package."""

    registry: PackageRegistry
    _refs: dict[str, PackageRef | None] = field(default_factory=dict)
    _names: list[str] | None = None

    def current(self, name: str) -> PackageRef | None:
        if name not in self._refs:
            self._refs[name] = self.registry.current(name)
        return self._refs[name]

    def names(self) -> list[str]:
        if self._names is None:
            self._names = self.registry.names()
        return self._names


def params_from_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """`param-<name>` S3 user metadata (keys arrive lowercased, without x-amz-meta-) -> {name: text}."""
    return {
        key[len(PARAM_METADATA_PREFIX):]: decode_metadata_value(value)
        for key, value in metadata.items()
        if key.lower().startswith(PARAM_METADATA_PREFIX)
    }


def param_metadata(params: Mapping[str, str]) -> dict[str, str]:
    """{name: text} -> the upload's `param-<name>` S3 user metadata (what params_from_metadata reads back)."""
    return {f"{PARAM_METADATA_PREFIX}{name}": encode_metadata_value(text) for name, text in params.items()}


def encode_metadata_value(text: str) -> str:
    """A metadata value as S3 takes it: HTTP headers are ASCII, so other text goes as an RFC 2047 word."""
    return text if text.isascii() else email.charset.Charset("utf-8").header_encode(text)


def decode_metadata_value(value: str) -> str:
    """The text of a metadata value: S3 returns non-ASCII values RFC 2047-encoded (=?UTF-8?B?...?=)."""
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (email.errors.HeaderParseError, LookupError, UnicodeDecodeError):
        return value  # not an encoded word after all: validated as the text it is


def route_upload(
    key: str, metadata: Mapping[str, str], default_job: str | None, lookup: PackageLookup
) -> Route:
    """The package and typed parameters for `key`; UploadRefused says what to fix."""
    folder = key.split("/", 1)[0] if "/" in key else None
    ref = lookup.current(folder) if folder and NAME_PATTERN.match(folder) else None
    by_prefix = ref is not None
    if ref is None:
        if default_job is None:
            raise UploadRefused(
                f"no job runs this key: the deployment has no default job{_not_a_job(folder, lookup)}; upload "
                "under <name>/ of a deployed job package (`batchworker job list`), or set Terraform default_job"
            )
        ref = lookup.current(default_job)
        if ref is None:
            raise UploadRefused(
                f"the default job {default_job!r} is not deployed{_not_a_job(folder, lookup)}; deploy it with "
                f"`batchworker job deploy PATH` (or `terraform apply`, which ships the bundled one)"
            )
    if not ref.config.accepts(key):
        name = key.rsplit("/", 1)[-1]
        extension = ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else "(no extension)"
        message = (
            f"job {ref.name!r} does not accept {extension} files (it accepts {', '.join(ref.config.accept)}); "
            "upload a file with one of those extensions"
        )
        if not by_prefix and folder:
            message += f". This key went to the default job because {_not_a_job(folder, lookup).lstrip('; ')}"
        raise UploadRefused(message)
    try:
        params = ref.config.resolve_params(params_from_metadata(metadata))
    except InvalidParams as exc:
        raise UploadRefused(
            f"{exc} (S3 metadata param-<name> of the upload, checked against job {ref.name!r} "
            f"version {ref.version[:12]}); upload again with a valid value"
        ) from exc
    return Route(package=ref, params=params, by_prefix=by_prefix)


def _not_a_job(folder: str | None, lookup: PackageLookup) -> str:
    """'; no job package "x" is deployed (did you mean "y"?)' for a first folder that names no package."""
    if not folder:
        return ""
    close = difflib.get_close_matches(folder, lookup.names(), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0] + '/'!r}?)" if close else ""
    return f"; no job package {folder!r} is deployed{hint}"
