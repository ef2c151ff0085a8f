locals {
  instance_arn_pattern = "arn:${local.partition}:ec2:${var.region}:${local.account_id}:instance/*"
  parameter_arn_prefix = "arn:${local.partition}:ssm:${var.region}:${local.account_id}:parameter${local.parameter_prefix}"
  # Built from the name, not from aws_lambda_function.this: the functions depend on their policies.
  worker_function_arn = "arn:${local.partition}:lambda:${var.region}:${local.account_id}:function:${var.name_prefix}-worker"

  jobs_table_arns            = [aws_dynamodb_table.jobs.arn, "${aws_dynamodb_table.jobs.arn}/index/*"]
  instance_events_table_arns = [aws_dynamodb_table.instance_events.arn]

  lambda_policy_json = {
    trigger = data.aws_iam_policy_document.trigger.json
    worker  = data.aws_iam_policy_document.worker.json
    stop    = data.aws_iam_policy_document.stop.json
  }
}

################################################################################
# Lambda roles: one per function
################################################################################

data "aws_iam_policy_document" "lambda_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "lambda" {
  for_each = local.lambda_timeout_seconds

  name               = "${var.name_prefix}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume.json
}

resource "aws_iam_role_policy" "lambda" {
  for_each = local.lambda_timeout_seconds

  name   = "${var.name_prefix}-${each.key}"
  role   = aws_iam_role.lambda[each.key].id
  policy = local.lambda_policy_json[each.key]
}

data "aws_iam_policy_document" "trigger" {
  # trigger: consume S3 upload events from the jobs queue (event source mapping).
  statement {
    sid       = "ConsumeJobsQueue"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.jobs.arn]
  }

  # trigger: record jobs as QUEUED (idempotent put) and find active jobs by status.
  statement {
    sid       = "JobsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query"]
    resources = local.jobs_table_arns
  }

  # trigger: record the instance starts it requests.
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:Query"]
    resources = local.instance_events_table_arns
  }

  # trigger: find pool instances by tag and state (Describe* has no resource-level permissions).
  statement {
    sid       = "DescribeInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }

  # trigger: start a stopped instance, only one of this pool.
  statement {
    sid       = "StartPoolInstances"
    actions   = ["ec2:StartInstances"]
    resources = [local.instance_arn_pattern]

    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/batchworker:pool"
      values   = [var.name_prefix]
    }
  }

  # trigger: read an upload's version id when the event lacks it (HeadObject needs s3:GetObject).
  statement {
    sid       = "HeadInputObjects"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${aws_s3_bucket.this["input"].arn}/*"]
  }

  # trigger: hand the job to the worker (dispatcher) function asynchronously.
  statement {
    sid       = "InvokeWorker"
    actions   = ["lambda:InvokeFunction"]
    resources = [local.worker_function_arn]
  }

  # trigger: write its own logs.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda["trigger"].arn}:*"]
  }
}

data "aws_iam_policy_document" "worker" {
  # worker: read the job and move it to RUNNING (or FAILED when dispatch fails).
  statement {
    sid       = "JobsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Query"]
    resources = local.jobs_table_arns
  }

  # worker: record instance readiness events.
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:Query"]
    resources = local.instance_events_table_arns
  }

  # worker: wait until the instance is running (Describe* has no resource-level permissions).
  statement {
    sid       = "DescribeInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }

  # worker: start the instance again if it was stopped meanwhile, only one of this pool.
  statement {
    sid       = "StartPoolInstances"
    actions   = ["ec2:StartInstances"]
    resources = [local.instance_arn_pattern]

    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/batchworker:pool"
      values   = [var.name_prefix]
    }
  }

  # worker: read the instance's published SSH endpoint and host key, and the login key.
  statement {
    sid     = "ReadSshParameters"
    actions = ["ssm:GetParameter"]
    resources = [
      "${local.parameter_arn_prefix}/instances/*",
      "${local.parameter_arn_prefix}/ssh/private-key",
    ]
  }

  # worker: write a failed manifest for a job it cannot start (so stop learns of it).
  statement {
    sid       = "WriteFailedManifests"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # worker: decrypt the SecureString private key (aws/ssm key, only through SSM).
  statement {
    sid       = "DecryptSshKey"
    actions   = ["kms:Decrypt"]
    resources = ["*"]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["ssm.${var.region}.amazonaws.com"]
    }
  }

  # worker: write its own logs.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda["worker"].arn}:*"]
  }
}

data "aws_iam_policy_document" "stop" {
  # stop: consume manifest.json events from the done queue (event source mapping).
  statement {
    sid       = "ConsumeDoneQueue"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.done.arn]
  }

  # stop: read the manifest a job wrote.
  statement {
    sid       = "ReadManifests"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # stop: set the final job status and check the instance has no queued/running job left.
  statement {
    sid       = "JobsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Query"]
    resources = local.jobs_table_arns
  }

  # stop: record the instance stops it requests.
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:Query"]
    resources = local.instance_events_table_arns
  }

  # stop: check the instance's state (Describe* has no resource-level permissions).
  statement {
    sid       = "DescribeInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }

  # stop: stop an idle instance, only one of this pool.
  statement {
    sid       = "StopPoolInstances"
    actions   = ["ec2:StopInstances"]
    resources = [local.instance_arn_pattern]

    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/batchworker:pool"
      values   = [var.name_prefix]
    }
  }

  # stop: write its own logs.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda["stop"].arn}:*"]
  }
}

################################################################################
# GPU instance role: the job reads inputs and the model, writes results, publishes its SSH endpoint
################################################################################

data "aws_iam_policy_document" "gpu_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "gpu" {
  name               = "${var.name_prefix}-gpu"
  assume_role_policy = data.aws_iam_policy_document.gpu_assume.json
}

data "aws_iam_policy_document" "gpu" {
  # instance (job): download the uploaded input, at the version the event named.
  statement {
    sid       = "ReadInputs"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${aws_s3_bucket.this["input"].arn}/*"]
  }

  # instance (job): download the model (bundled one or var.model_uri).
  statement {
    sid       = "ReadModel"
    actions   = ["s3:GetObject"]
    resources = ["arn:${local.partition}:s3:::${local.model_object_path}"]
  }

  # instance (job): upload predictions, job.log and manifest.json under jobs/<job_id>/.
  statement {
    sid       = "WriteResults"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # instance (user data): publish its SSH endpoint and host key for the worker function.
  statement {
    sid       = "PublishSshEndpoint"
    actions   = ["ssm:PutParameter"]
    resources = ["${local.parameter_arn_prefix}/instances/*"]
  }
}

resource "aws_iam_role_policy" "gpu" {
  name   = "${var.name_prefix}-gpu"
  role   = aws_iam_role.gpu.id
  policy = data.aws_iam_policy_document.gpu.json
}

resource "aws_iam_instance_profile" "gpu" {
  name = "${var.name_prefix}-gpu"
  role = aws_iam_role.gpu.name
}
