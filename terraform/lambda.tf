################################################################################
# Functions: trigger (jobs queue -> start instance -> invoke worker),
# worker (the dispatcher: wait for the instance, launch the job over SSM Run Command or SSH),
# stop (done queue -> final status -> stop idle instance).
# Zips come from scripts/build_lambdas.py.
################################################################################

resource "aws_cloudwatch_log_group" "lambda" {
  #checkov:skip=CKV_AWS_158:CloudWatch Logs encrypts log data at rest already; a KMS key adds a key policy and cost for logs without secrets.
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days (default 30): a year of dispatch logs is cost without use here.
  for_each = local.lambda_timeout_seconds

  name              = "/aws/lambda/${var.name_prefix}-${each.key}"
  retention_in_days = var.log_retention_days
}

resource "aws_lambda_function" "this" {
  #checkov:skip=CKV_AWS_116:trigger and stop are fed by SQS (redrive DLQs); worker sends failed async events to an on-failure destination (event invoke config).
  #checkov:skip=CKV_AWS_117:Only the worker may need a VPC (SSH to private IPs): lambda_subnet_ids puts it there; the others call public AWS APIs only.
  #checkov:skip=CKV_AWS_115:Reserved concurrency takes capacity from the account pool and fails on new accounts (limit 10): opt in with reserved_concurrency.
  #checkov:skip=CKV_AWS_272:Zips are built reproducibly from this repository by scripts/build_lambdas.py; code signing needs an AWS Signer profile per account.
  #checkov:skip=CKV_AWS_173:The environment holds names only (buckets, tables, prefix), no secrets: the SSH key stays in SSM; AWS encrypts it at rest.
  #checkov:skip=CKV_AWS_50:Powertools logs carry job_id end to end; X-Ray would add IAM and cost for three short functions.
  for_each = local.lambda_timeout_seconds

  function_name    = "${var.name_prefix}-${each.key}"
  description      = "batchworker ${each.key}"
  role             = aws_iam_role.lambda[each.key].arn
  filename         = "${local.lambda_build_dir}/${each.key}.zip"
  source_code_hash = filebase64sha256("${local.lambda_build_dir}/${each.key}.zip")
  handler          = "app.handler"
  runtime          = "python3.11"
  architectures    = ["x86_64"]
  timeout          = each.value
  memory_size      = 256
  # Off (-1) unless set: at scale, reserve some for trigger and stop so a flood of dispatchers cannot starve them.
  reserved_concurrent_executions = lookup(var.reserved_concurrency, each.key, -1)

  environment {
    variables = local.lambda_environment
  }

  # worker only, when lambda_subnet_ids is set: reach instances' private IPs over SSH.
  dynamic "vpc_config" {
    for_each = each.key == "worker" && local.worker_in_vpc ? [1] : []

    content {
      subnet_ids         = var.lambda_subnet_ids
      security_group_ids = var.lambda_security_group_ids
    }
  }

  depends_on = [
    aws_cloudwatch_log_group.lambda,
    aws_iam_role_policy.lambda,
  ]
}

# worker is invoked asynchronously by trigger: an event that fails every retry goes to the worker DLQ
# instead of vanishing (the job also stays visible as queued/dispatched in the jobs table).
resource "aws_lambda_function_event_invoke_config" "worker" {
  function_name          = aws_lambda_function.this["worker"].function_name
  maximum_retry_attempts = 2

  destination_config {
    on_failure {
      destination = aws_sqs_queue.worker_dlq.arn
    }
  }
}

################################################################################
# Queue -> function wiring (disabled in the local cloud, whose runtime polls instead)
################################################################################

resource "aws_lambda_event_source_mapping" "jobs" {
  event_source_arn                   = aws_sqs_queue.jobs.arn
  function_name                      = aws_lambda_function.this["trigger"].arn
  batch_size                         = var.event_source_batch_size
  maximum_batching_window_in_seconds = local.trigger_batching_window_seconds
  function_response_types            = ["ReportBatchItemFailures"]
  enabled                            = var.event_source_mappings_enabled
}

resource "aws_lambda_event_source_mapping" "done" {
  event_source_arn                   = aws_sqs_queue.done.arn
  function_name                      = aws_lambda_function.this["stop"].arn
  batch_size                         = var.event_source_batch_size
  maximum_batching_window_in_seconds = 1 # manifests of one burst: one stop decision per instance
  function_response_types            = ["ReportBatchItemFailures"]
  enabled                            = var.event_source_mappings_enabled
}
