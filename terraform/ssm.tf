################################################################################
# SSM Run Command transport: the one document the worker function may run on pool instances.
# The job spec travels as a typed, pattern-checked parameter, never as shell text.
################################################################################

resource "aws_ssm_document" "run_job" {
  name            = local.ssm_document_name
  document_type   = "Command"
  document_format = "JSON"
  target_type     = "/AWS::EC2::Instance"

  content = jsonencode({
    schemaVersion = "2.2"
    description   = "batchworker: start one job on this GPU instance (spec in JobSpec, base64 JSON)."
    parameters = {
      JobSpec = {
        type        = "String"
        description = "Base64 of the job spec JSON (batchworker-job launch reads it on stdin)."
        # Base64 alphabet only: no quote, space, newline or shell metacharacter can get through.
        allowedPattern = "^[A-Za-z0-9+/]{4,12000}={0,2}$"
      }
      executionTimeout = {
        type        = "String"
        description = "Seconds before the command is stopped (SSM allows 1 to 172800)."
        default     = tostring(var.max_job_runtime_seconds)
        # 1 to 172800, as in AWS-RunShellScript.
        allowedPattern = "^([1-9][0-9]{0,4}|1[0-6][0-9]{4}|17[01][0-9]{3}|172[0-7][0-9]{2}|172800)$"
      }
    }
    mainSteps = [
      {
        action = "aws:runShellScript"
        name   = "launchJob"
        inputs = {
          timeoutSeconds = "{{ executionTimeout }}"
          # POSIX sh (the agent may run dash): no pipefail, no bashisms.
          runCommand = [
            "set -eu",
            "# User data marks the instance ready once the job package is installed on this boot.",
            "for _ in $(seq 1 60); do [ -e /run/batchworker/ready ] && break; sleep 5; done",
            "if [ ! -e /run/batchworker/ready ]; then echo 'batchworker: instance not ready after 300 s (job package not installed); see /var/log/batchworker-boot.log' >&2; exit 75; fi",
            "# JobSpec is checked against ^[A-Za-z0-9+/]{4,12000}={0,2}$ before this runs, so it holds no",
            "# quote and cannot leave the single quotes below; the decoded JSON only ever reaches stdin.",
            "printf '%s' '{{ JobSpec }}' | base64 --decode | runuser -u ${var.ssh_user} -- ${var.job_command}",
          ]
        }
      },
    ]
  })
}

################################################################################
# Pointer to the current job package: user data reads it on every boot and installs the package
# when its sha256 changed, so a new package needs no new instance.
################################################################################

resource "aws_ssm_parameter" "job_package" {
  #checkov:skip=CKV2_AWS_34:Not a secret: the S3 location and sha256 of the job package.
  name        = local.job_package_pointer
  description = "batchworker job package the GPU instances install at boot (S3 location, version, sha256)."
  type        = "String"
  value = jsonencode({
    bucket     = aws_s3_object.job_package.bucket
    key        = aws_s3_object.job_package.key
    version_id = aws_s3_object.job_package.version_id
    sha256     = local.job_package.sha256
  })
}
