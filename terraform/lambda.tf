################################################################################
# Functions: trigger (jobs queue -> start instance -> invoke worker),
# worker (the dispatcher: wait for the instance, launch the job over SSH),
# stop (done queue -> final status -> stop idle instance).
# Zips come from scripts/build_lambdas.py.
################################################################################

resource "aws_cloudwatch_log_group" "lambda" {
  for_each = local.lambda_timeout_seconds

  name              = "/aws/lambda/${var.name_prefix}-${each.key}"
  retention_in_days = var.log_retention_days
}

resource "aws_lambda_function" "this" {
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

  environment {
    variables = local.lambda_environment
  }

  depends_on = [
    aws_cloudwatch_log_group.lambda,
    aws_iam_role_policy.lambda,
  ]
}

################################################################################
# Queue -> function wiring (disabled in the local cloud, whose runtime polls instead)
################################################################################

resource "aws_lambda_event_source_mapping" "jobs" {
  event_source_arn                   = aws_sqs_queue.jobs.arn
  function_name                      = aws_lambda_function.this["trigger"].arn
  batch_size                         = var.event_source_batch_size
  maximum_batching_window_in_seconds = 1
  function_response_types            = ["ReportBatchItemFailures"]
  enabled                            = var.event_source_mappings_enabled
}

resource "aws_lambda_event_source_mapping" "done" {
  event_source_arn                   = aws_sqs_queue.done.arn
  function_name                      = aws_lambda_function.this["stop"].arn
  batch_size                         = var.event_source_batch_size
  maximum_batching_window_in_seconds = 1
  function_response_types            = ["ReportBatchItemFailures"]
  enabled                            = var.event_source_mappings_enabled
}
