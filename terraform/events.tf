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
