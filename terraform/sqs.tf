################################################################################
# jobs: input ObjectCreated events -> trigger function
# done: output manifest.json events -> stop function
# Each has a dead-letter queue; visibility timeout is 6x the consumer's timeout.
################################################################################

resource "aws_sqs_queue" "jobs_dlq" {
  name                      = "${var.name_prefix}-jobs-dlq"
  message_retention_seconds = 1209600
  sqs_managed_sse_enabled   = true
}

resource "aws_sqs_queue" "jobs" {
  name                       = "${var.name_prefix}-jobs"
  visibility_timeout_seconds = 6 * local.lambda_timeout_seconds.trigger
  message_retention_seconds  = 345600
  receive_wait_time_seconds  = 20
  sqs_managed_sse_enabled    = true

  # Managed by aws_sqs_queue_redrive_policy below. Reading it back here gives a perpetual
  # whitespace diff against moto (which returns JSON with spaces).
  lifecycle {
    ignore_changes = [redrive_policy]
  }
}

resource "aws_sqs_queue_redrive_policy" "jobs" {
  queue_url = aws_sqs_queue.jobs.id
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.jobs_dlq.arn
    maxReceiveCount     = var.max_receive_count
  })
}

resource "aws_sqs_queue" "done_dlq" {
  name                      = "${var.name_prefix}-done-dlq"
  message_retention_seconds = 1209600
  sqs_managed_sse_enabled   = true
}

resource "aws_sqs_queue" "done" {
  name                       = "${var.name_prefix}-done"
  visibility_timeout_seconds = 6 * local.lambda_timeout_seconds.stop
  message_retention_seconds  = 345600
  receive_wait_time_seconds  = 20
  sqs_managed_sse_enabled    = true

  # Managed by aws_sqs_queue_redrive_policy below. Reading it back here gives a perpetual
  # whitespace diff against moto (which returns JSON with spaces).
  lifecycle {
    ignore_changes = [redrive_policy]
  }
}

resource "aws_sqs_queue_redrive_policy" "done" {
  queue_url = aws_sqs_queue.done.id
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.done_dlq.arn
    maxReceiveCount     = var.max_receive_count
  })
}

################################################################################
# worker-dlq: asynchronous invocations of the worker function that failed every retry
################################################################################

resource "aws_sqs_queue" "worker_dlq" {
  name                      = "${var.name_prefix}-worker-dlq"
  message_retention_seconds = 1209600
  sqs_managed_sse_enabled   = true
}

################################################################################
# Queue policies: only S3 may send, and only from our bucket in our account
################################################################################

data "aws_iam_policy_document" "jobs_queue" {
  # S3 (input bucket) -> jobs queue: deliver ObjectCreated notifications.
  statement {
    sid       = "AllowInputBucketNotifications"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.jobs.arn]

    principals {
      type        = "Service"
      identifiers = ["s3.amazonaws.com"]
    }

    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = [aws_s3_bucket.this["input"].arn]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_sqs_queue_policy" "jobs" {
  queue_url = aws_sqs_queue.jobs.id
  policy    = data.aws_iam_policy_document.jobs_queue.json

  # Both write SetQueueAttributes on the same queue; run them one after the other.
  depends_on = [aws_sqs_queue_redrive_policy.jobs]
}

data "aws_iam_policy_document" "done_queue" {
  # S3 (output bucket) -> done queue: deliver manifest.json notifications.
  statement {
    sid       = "AllowOutputBucketNotifications"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.done.arn]

    principals {
      type        = "Service"
      identifiers = ["s3.amazonaws.com"]
    }

    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = [aws_s3_bucket.this["output"].arn]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_sqs_queue_policy" "done" {
  queue_url = aws_sqs_queue.done.id
  policy    = data.aws_iam_policy_document.done_queue.json

  # Both write SetQueueAttributes on the same queue; run them one after the other.
  depends_on = [aws_sqs_queue_redrive_policy.done]
}
