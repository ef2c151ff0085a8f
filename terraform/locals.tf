data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  is_local   = var.aws_endpoint_url != null
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  parameter_prefix = "/${var.name_prefix}"

  # Bucket names are global and IAM names account-wide: the region in them lets the same name_prefix be
  # deployed in a second region without a collision.
  global_name_suffix = var.region_in_global_names ? "-${var.region}" : ""
  # S3 allows 63 characters. Terraform 1.0 has no cross-variable validation: a name too long fails the plan
  # here (the impossible number conversion) with this message rather than later at the S3 call.
  bucket_names = {
    for key in ["input", "output", "artifacts"] :
    key => tonumber(
      length("${var.name_prefix}-${key}-${local.account_id}${local.global_name_suffix}") > 63
      ? "bucket names would exceed 63 characters: shorten name_prefix (or set region_in_global_names = false)"
      : "0"
    ) == 0 ? "${var.name_prefix}-${key}-${local.account_id}${local.global_name_suffix}" : ""
  }


  lambda_build_dir = coalesce(var.lambda_build_dir, "${path.module}/../build/lambdas")

  # The job package (instance side) from scripts/build_lambdas.py: build/job/<wheel> + job-package.json
  # ({"wheel": "batchworker_job-<version>-py3-none-any.whl", "sha256": ..., "version": ...}).
  job_package_dir      = coalesce(var.job_package_dir, "${path.module}/../build/job")
  job_package          = jsondecode(file("${local.job_package_dir}/job-package.json"))
  job_package_key      = "packages/${local.job_package.wheel}"
  job_package_pointer  = "${local.parameter_prefix}/job-package"
  ssh_endpoint_pattern = "${local.parameter_prefix}/instances/*/ssh-endpoint"

  # The default job package from scripts/bundle_default_job.py (make build): build/default-job/ holds
  # <sha256>.tar.gz, <sha256>.json, bundled.json and the index default-job.json ({"name", "version"}).
  # Without a build there is nothing to ship, and `job deploy` is the only way to deploy it.
  default_job_bundle_dir = coalesce(var.default_job_bundle_dir, "${path.module}/../build/default-job")
  default_job_bundle = (fileexists("${local.default_job_bundle_dir}/default-job.json")
    ? jsondecode(file("${local.default_job_bundle_dir}/default-job.json"))
  : null)
  default_job_bundle_files = local.default_job_bundle == null ? {} : {
    "${local.default_job_bundle.version}.tar.gz" = "application/gzip"
    "${local.default_job_bundle.version}.json"   = "application/json"
    "bundled.json"                               = "application/json"
  }

  # SSM Run Command output (stdout/stderr of the run-job document) lands here, in the output bucket.
  ssm_output_prefix = "ssm-output/"
  ssm_document_name = "${var.name_prefix}-run-job"

  # Where jobs keep their files, the package cache and environments on the instance (user data creates it).
  instance_job_root = "/var/lib/batchworker/jobs"

  # The Lambda functions. "worker" is the dispatcher Lambda (waits for an instance and launches the job
  # over SSM Run Command or SSH); the GPU box that runs the job is aws_instance.gpu. "reaper" runs on a
  # schedule (events.tf): fails lost or overlong jobs, re-dispatches stuck ones, stops idle instances.
  lambda_timeout_seconds = {
    trigger = 60
    worker  = 900
    stop    = 60
    reaper  = 120
  }

  # Settings of batchworker.config.Settings.from_env (docs/architecture.md, "Settings"). Every function
  # gets the same map: Settings is one frozen object, and a value one function does not use costs nothing.
  lambda_environment = {
    BATCHWORKER_INPUT_BUCKET                   = aws_s3_bucket.this["input"].id
    BATCHWORKER_OUTPUT_BUCKET                  = aws_s3_bucket.this["output"].id
    BATCHWORKER_JOBS_TABLE                     = aws_dynamodb_table.jobs.name
    BATCHWORKER_INSTANCE_EVENTS_TABLE          = aws_dynamodb_table.instance_events.name
    BATCHWORKER_POOL_TAG                       = var.name_prefix
    BATCHWORKER_WORKER_FUNCTION                = "${var.name_prefix}-worker"
    BATCHWORKER_ARTIFACTS_BUCKET               = aws_s3_bucket.this["artifacts"].id
    BATCHWORKER_DEFAULT_JOB                    = var.default_job
    BATCHWORKER_PARAMETER_PREFIX               = local.parameter_prefix
    BATCHWORKER_SSH_USER                       = var.ssh_user
    BATCHWORKER_JOB_COMMAND                    = var.job_command
    BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS = tostring(var.instance_ready_timeout_seconds)
    BATCHWORKER_INSTANCE_STATE_EVENTS          = "true" # events.tf routes them to the worker
    BATCHWORKER_MAX_CAPACITY_WAIT_SECONDS      = tostring(var.max_capacity_wait_seconds)
    BATCHWORKER_JOB_RETENTION_DAYS             = tostring(var.job_retention_days)
    BATCHWORKER_IDLE_GRACE_SECONDS             = tostring(var.idle_grace_seconds)
    BATCHWORKER_IDLE_GRACE_POLICY              = var.idle_grace_policy
    BATCHWORKER_MAX_JOBS_PER_INSTANCE          = tostring(var.max_jobs_per_instance)
    BATCHWORKER_JOB_LEASE_SECONDS              = tostring(var.job_lease_seconds)
    BATCHWORKER_MAX_ATTEMPTS                   = tostring(var.max_attempts)
    BATCHWORKER_MAX_JOB_RUNTIME_SECONDS        = tostring(var.max_job_runtime_seconds)
    BATCHWORKER_TRANSPORT                      = var.transport
    BATCHWORKER_SSM_DOCUMENT                   = aws_ssm_document.run_job.name
    BATCHWORKER_SSM_OUTPUT_BUCKET              = aws_s3_bucket.this["output"].id
    BATCHWORKER_SSM_OUTPUT_PREFIX              = local.ssm_output_prefix
    POWERTOOLS_SERVICE_NAME                    = var.name_prefix
  }

  # Lambda refuses an SQS batch size over 10 without a batching window. Terraform 1.0 has no cross-variable
  # validation: the impossible number conversion below fails the plan with this message instead.
  trigger_batching_window_seconds = tonumber(
    var.event_source_batch_size > 10 && var.trigger_batching_window_seconds < 1
    ? "event_source_batch_size over 10 needs trigger_batching_window_seconds of at least 1 (AWS Lambda refuses it)"
    : var.trigger_batching_window_seconds
  )
}
