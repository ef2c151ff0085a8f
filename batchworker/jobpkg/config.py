"""job.toml: the schema of a job package, and the typed parameters of one upload."""

from __future__ import annotations

import difflib
import math
import posixpath
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from batchworker.jobpkg.errors import InvalidJobConfig, InvalidParams

CONFIG_FILE = "job.toml"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
# Lowercase because S3 returns user metadata keys in lowercase (`param-<name>`).
PARAM_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
ENTRYPOINT_PATTERN = re.compile(rf"^({_IDENTIFIER}(?:\.{_IDENTIFIER})*):({_IDENTIFIER})$")
EXTENSION_PATTERN = re.compile(r"^\.[a-z0-9]+(?:\.[a-z0-9]+)*$")
PARAM_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
MAX_STR_PARAM_CHARS = 1024

TOP_LEVEL_FIELDS = ("name", "entrypoint", "requirements", "accept", "max_failed_ratio", "description", "params")
PARAM_FIELDS = ("type", "default", "min", "max", "choices", "description")


@dataclass(frozen=True)
class ParamSpec:
    """One `[params.<name>]` table. No default means every upload must give the parameter."""

    name: str
    type: str
    default: object = None
    min: float | int | None = None
    max: float | int | None = None
    choices: tuple = ()
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def resolve(self, raw: object) -> object:
        """The typed value of `raw` (a string from S3 metadata or the CLI, or a native value); InvalidParams if unfit."""
        value = _coerce(self.name, self.type, raw)
        self.check(value)
        return value

    def check(self, value: object) -> None:
        if self.min is not None and value < self.min:
            raise InvalidParams(f"parameter {self.name!r} is {value!r}, below its minimum {self.min!r}")
        if self.max is not None and value > self.max:
            raise InvalidParams(f"parameter {self.name!r} is {value!r}, above its maximum {self.max!r}")
        if self.choices and value not in self.choices:
            raise InvalidParams(
                f"parameter {self.name!r} is {value!r}; choose one of {', '.join(repr(c) for c in self.choices)}"
            )

    def to_dict(self) -> dict:
        data: dict = {"type": self.type}
        for name in ("default", "min", "max"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.choices:
            data["choices"] = list(self.choices)
        if self.description:
            data["description"] = self.description
        return data


@dataclass(frozen=True)
class JobConfig:
    """A parsed, valid job.toml. Build it with `parse_job_config`, `load_job_config` or `from_dict`."""

    name: str
    entrypoint: str
    accept: tuple[str, ...]
    requirements: str | None = None
    max_failed_ratio: float = 0.0
    description: str = ""
    params: Mapping[str, ParamSpec] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return self.entrypoint.split(":", 1)[0]

    @property
    def class_name(self) -> str:
        return self.entrypoint.split(":", 1)[1]

    @property
    def module_paths(self) -> tuple[str, str]:
        """Where the entrypoint module may live inside the package: `a/b.py` or `a/b/__init__.py`."""
        base = self.module.replace(".", "/")
        return f"{base}.py", f"{base}/__init__.py"

    def accepts(self, key: str) -> bool:
        """Whether an input object's name ends with one of `accept` (case-insensitive)."""
        name = key.rsplit("/", 1)[-1].lower()
        return any(name.endswith(ext) and len(name) > len(ext) for ext in self.accept)

    def resolve_params(self, raw: Mapping[str, object]) -> dict:
        """Typed parameters with defaults applied, in declaration order; InvalidParams names the first bad one."""
        unknown = sorted(set(raw) - set(self.params))
        if unknown:
            raise InvalidParams(_unknown_param_message(self, unknown[0]))
        resolved = {}
        for name, spec in self.params.items():
            if name in raw:
                resolved[name] = spec.resolve(raw[name])
            elif spec.required:
                raise InvalidParams(
                    f"parameter {name!r} is required by job {self.name!r} and has no default; "
                    f"pass it as S3 metadata param-{name}=... or `--param {name}=...`"
                )
            else:
                resolved[name] = spec.default
        return resolved

    def to_dict(self) -> dict:
        data: dict = {"name": self.name, "entrypoint": self.entrypoint, "accept": list(self.accept)}
        if self.requirements is not None:
            data["requirements"] = self.requirements
        data["max_failed_ratio"] = self.max_failed_ratio
        if self.description:
            data["description"] = self.description
        data["params"] = {name: spec.to_dict() for name, spec in self.params.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping, *, origin: str = "job config") -> JobConfig:
        return _from_mapping(data, origin)


def parse_job_config(text: str, *, origin: str) -> JobConfig:
    """Parse job.toml text; `origin` (a path or URI) starts every error message."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidJobConfig(f"{origin}: not valid TOML: {exc}") from exc
    return _from_mapping(data, origin)


def load_job_config(package_dir: Path) -> JobConfig:
    """Read `<package_dir>/job.toml` and check the files it names exist inside the package."""
    package_dir = Path(package_dir)
    path = package_dir / CONFIG_FILE
    if not path.is_file():
        raise InvalidJobConfig(f"{package_dir}: no {CONFIG_FILE}; a job package is a folder with a {CONFIG_FILE}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJobConfig(f"{path}: not UTF-8 text: {exc}") from exc
    config = parse_job_config(text, origin=str(path))
    root = package_dir.resolve()
    if config.requirements is not None:
        requirements = (package_dir / config.requirements).resolve()
        if not requirements.is_relative_to(root) or not requirements.is_file():
            raise InvalidJobConfig(
                f"{path}: requirements = {config.requirements!r} is not a file inside the package; "
                "create it or remove the requirements line"
            )
    candidates = [(package_dir / p).resolve() for p in config.module_paths]
    if not any(c.is_relative_to(root) and c.is_file() for c in candidates):
        raise InvalidJobConfig(
            f"{path}: entrypoint {config.entrypoint!r} names module {config.module!r}, but the package has "
            f"neither {' nor '.join(config.module_paths)}"
        )
    return config


def _from_mapping(data: Mapping, origin: str) -> JobConfig:
    def fail(message: str) -> InvalidJobConfig:
        return InvalidJobConfig(f"{origin}: {message}")

    if not isinstance(data, Mapping):
        raise fail("expected a table of settings")
    unknown = [key for key in data if key not in TOP_LEVEL_FIELDS]
    if unknown:
        raise fail(_unknown_field_message(unknown[0], TOP_LEVEL_FIELDS, "setting"))

    name = data.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise fail(
            f"name = {name!r} is not a valid job name; use 1-40 characters: a lowercase letter, then lowercase "
            "letters, digits or '-' (uploads under '<name>/' run the job)"
        )
    entrypoint = data.get("entrypoint")
    if not isinstance(entrypoint, str) or not ENTRYPOINT_PATTERN.match(entrypoint):
        raise fail(
            f"entrypoint = {entrypoint!r} is not 'module:Class'; for a class Job in handler.py write "
            "entrypoint = \"handler:Job\""
        )
    requirements = data.get("requirements")
    if requirements is not None:
        requirements = _package_relative_path(requirements, fail)
    accept = _accept(data.get("accept"), fail)
    ratio = data.get("max_failed_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise fail(f"max_failed_ratio = {ratio!r} must be a number from 0.0 to 1.0 (the share of items allowed to fail)")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("description must be a string")
    raw_params = data.get("params", {})
    if not isinstance(raw_params, Mapping):
        raise fail("params must be tables: [params.<name>] with type = \"int\" | \"float\" | \"str\" | \"bool\"")
    params = {pname: _param(pname, spec, fail) for pname, spec in raw_params.items()}
    return JobConfig(
        name=name,
        entrypoint=entrypoint,
        accept=accept,
        requirements=requirements,
        max_failed_ratio=float(ratio),
        description=description,
        params=params,
    )


def _package_relative_path(value: object, fail) -> str:
    if not isinstance(value, str) or not value:
        raise fail(f"requirements = {value!r} must be a path relative to the package, like \"requirements.txt\"")
    normalized = posixpath.normpath(value.replace("\\", "/"))
    if normalized.startswith("/") or normalized == ".." or normalized.startswith("../") or ":" in normalized:
        raise fail(f"requirements = {value!r} points outside the package; use a path inside it, like \"requirements.txt\"")
    return normalized


def _accept(value: object, fail) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise fail("accept must list the input extensions the job takes, like accept = [\".png\", \".zip\"]")
    extensions = []
    for ext in value:
        if not isinstance(ext, str) or not EXTENSION_PATTERN.match(ext):
            hint = f" (write {ext.lower()!r})" if isinstance(ext, str) and EXTENSION_PATTERN.match(ext.lower()) else ""
            raise fail(f"accept entry {ext!r} must be a lowercase extension with its dot, like \".csv\"{hint}")
        if ext not in extensions:
            extensions.append(ext)
    return tuple(extensions)


def _param(name: object, spec: object, fail) -> ParamSpec:
    if not isinstance(name, str) or not PARAM_NAME_PATTERN.match(name):
        raise fail(
            f"parameter name {name!r} is not valid; use 1-40 characters: a lowercase letter, then lowercase letters, "
            "digits, '_' or '-' (S3 metadata keys are lowercase)"
        )
    where = f"[params.{name}]"
    if not isinstance(spec, Mapping):
        raise fail(f"{where} must be a table with type = \"int\" | \"float\" | \"str\" | \"bool\"")
    unknown = [key for key in spec if key not in PARAM_FIELDS]
    if unknown:
        raise fail(f"{where}: " + _unknown_field_message(unknown[0], PARAM_FIELDS, "key"))
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise fail(f"{where} type = {kind!r}; use one of \"int\", \"float\", \"str\", \"bool\"")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise fail(f"{where} description must be a string")

    def typed(key: str) -> object:
        value = spec.get(key)
        if value is None:
            return None
        try:
            return _native(name, kind, value)
        except InvalidParams as exc:
            raise fail(f"{where} {key}: {exc}") from None

    if kind in ("str", "bool") and any(spec.get(key) is not None for key in ("min", "max")):
        raise fail(f"{where}: min and max apply to int and float parameters only")
    bounds = {key: typed(key) for key in ("min", "max")}
    if bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
        raise fail(f"{where}: min {bounds['min']!r} is above max {bounds['max']!r}")
    choices = spec.get("choices", [])
    if not isinstance(choices, list) or (kind == "bool" and choices):
        raise fail(f"{where}: choices must be a list of {kind} values (and bool parameters take none)")
    try:
        choices = tuple(dict.fromkeys(_native(name, kind, c) for c in choices))
    except InvalidParams as exc:
        raise fail(f"{where} choices: {exc}") from None
    param = ParamSpec(name=name, type=kind, default=typed("default"), min=bounds["min"], max=bounds["max"],
                      choices=choices, description=description)
    if param.default is not None:
        try:
            param.check(param.default)
        except InvalidParams as exc:
            raise fail(f"{where} default does not fit: {exc}") from None
    return param


def _native(name: str, kind: str, value: object) -> object:
    """A value already typed (from TOML or JSON): accept it only as its declared type (int widens to float)."""
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str) and len(value) <= MAX_STR_PARAM_CHARS
    if not ok:
        raise InvalidParams(f"parameter {name!r} must be {_a(kind)}, got {value!r}")
    return value


def _coerce(name: str, kind: str, raw: object) -> object:
    """Strings (S3 metadata, `--param k=v`) become the declared type; typed values must already be it."""
    if not isinstance(raw, str) or kind == "str":
        return _native(name, kind, raw)
    text = raw.strip()
    if kind == "bool":
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise InvalidParams(f"parameter {name!r} must be true or false, got {raw!r}")
    if kind == "int":
        if not re.fullmatch(r"[+-]?\d{1,18}", text):
            raise InvalidParams(f"parameter {name!r} must be a whole number, got {raw!r}")
        return int(text)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidParams(f"parameter {name!r} must be a finite number, got {raw!r}")
    return value


def _a(kind: str) -> str:
    return {"int": "a whole number (int)", "float": "a number (float)", "str": "a string (at most "
            f"{MAX_STR_PARAM_CHARS} characters)", "bool": "true or false (bool)"}[kind]


def _unknown_field_message(key: object, known: tuple[str, ...], what: str) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {what} {key!r}; {hint}known: {', '.join(known)}"


def _unknown_param_message(config: JobConfig, name: str) -> str:
    if not config.params:
        return f"parameter {name!r} is unknown: job {config.name!r} takes no parameters"
    close = difflib.get_close_matches(name, list(config.params), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"parameter {name!r} is unknown to job {config.name!r}; {hint}it takes: {', '.join(config.params)}"
