################################################################################
# The reaper's schedule: whatever else breaks (a lost event, a crashed function, a job that never
# reports), the reaper fails or re-dispatches stuck jobs and stops idle instances.
################################################################################

resource "aws_cloudwatch_event_rule" "reaper" {
  name                = "${var.name_prefix}-reaper"
  description         = "batchworker: run the reaper pass (lost jobs, idle instances)"
  schedule_expression = var.reaper_schedule_expression
}

resource "aws_cloudwatch_event_target" "reaper" {
  rule      = aws_cloudwatch_event_rule.reaper.name
  target_id = "reaper"
  arn       = aws_lambda_function.this["reaper"].arn
}

resource "aws_lambda_permission" "reaper_schedule" {
  statement_id  = "AllowReaperSchedule"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.this["reaper"].function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.reaper.arn
}

################################################################################
# Instance state changes: the worker acts when an instance of the pool turns running (it launches the jobs
# waiting there) or stopped (it starts it again for jobs placed while it was stopping), so no dispatcher
# waits through a boot. EC2 sends these for every instance of the account and Region: the worker ignores an
# instance with no job placed on it (one ledger read). A lost event: the reaper invokes a dispatcher.
################################################################################

resource "aws_cloudwatch_event_rule" "instance_state" {
  name        = "${var.name_prefix}-instance-state"
  description = "batchworker: GPU instance running or stopped -> worker dispatches its waiting jobs"
  event_pattern = jsonencode({
    source        = ["aws.ec2"]
    "detail-type" = ["EC2 Instance State-change Notification"]
    detail        = { state = ["running", "stopped"] }
  })
}

resource "aws_cloudwatch_event_target" "instance_state" {
  rule      = aws_cloudwatch_event_rule.instance_state.name
  target_id = "worker"
  arn       = aws_lambda_function.this["worker"].arn
}

resource "aws_lambda_permission" "instance_state" {
  statement_id  = "AllowInstanceStateEvents"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.this["worker"].function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.instance_state.arn
}
