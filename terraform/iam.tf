################################################################################
# IAM: one role per Lambda function and one for the GPU instances, all through
# aws_iam_policy_document. Every statement starts with a comment naming who needs it
# ("trigger:", "worker:", "stop:", "reaper:", "instance (job):", "instance (user data):",
# "instance (SSM agent):") and why. moto enforces none of this: tests/unit/test_terraform_static.py
# checks the conditions that matter from the HCL.
################################################################################

locals {
  instance_arn_pattern = "arn:${local.partition}:ec2:${var.region}:${local.account_id}:instance/*"
  parameter_arn_prefix = "arn:${local.partition}:ssm:${var.region}:${local.account_id}:parameter${local.parameter_prefix}"
  # Built from the name, not from aws_lambda_function.this: the functions depend on their policies.
  worker_function_arn = "arn:${local.partition}:lambda:${var.region}:${local.account_id}:function:${var.name_prefix}-worker"

  jobs_table_arns            = [aws_dynamodb_table.jobs.arn, "${aws_dynamodb_table.jobs.arn}/index/*"]
  instance_events_table_arns = [aws_dynamodb_table.instance_events.arn]

  # Attributes the instance's lease renewal touches (the key included), for dynamodb:Attributes.
  job_lease_attributes = ["job_id", "status", "lease_expires_at", "updated_at", "running_since", "items_done", "items_total"]

  use_ssh        = var.transport == "ssh"
  use_ssm        = var.transport == "ssm"
  worker_in_vpc  = length(var.lambda_subnet_ids) > 0
  ssm_output_arn = "${aws_s3_bucket.this["output"].arn}/${local.ssm_output_prefix}*"

  lambda_policy_json = {
    trigger = data.aws_iam_policy_document.trigger.json
    worker  = data.aws_iam_policy_document.worker.json
    stop    = data.aws_iam_policy_document.stop.json
    reaper  = data.aws_iam_policy_document.reaper.json
  }
}

################################################################################
# Lambda roles: one per function
################################################################################

data "aws_iam_policy_document" "lambda_assume" {
  # Lambda service: assume the function roles.
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

  name               = "${var.name_prefix}-${each.key}${local.global_name_suffix}"
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

  # trigger: record the instance starts it requests, note the assignment in the instance's ledger
  # item (UpdateItem), which voids a stop claimed before it, and read the pool's idle-gap record
  # (GetItem, IdleGaps.note_arrival) before placing a batch.
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query", "dynamodb:UpdateItem"]
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

  # trigger: route each upload to a job package: read the package's pointer (current.json) or
  # Terraform's bundled record (bundled.json), with the config the upload is checked against.
  statement {
    sid       = "ReadJobPackagePointers"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["artifacts"].arn}/job-packages/*"]
  }

  # trigger: learn that a key's folder names no package (without s3:ListBucket S3 answers the GetObject
  # of a missing pointer with 403, not 404), and list package names to suggest one for a mistyped folder.
  statement {
    sid       = "ListJobPackages"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["artifacts"].arn]
  }

  # trigger: fail an input over max_input_bytes with a manifest, before any instance starts.
  statement {
    sid       = "WriteRejectedManifests"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
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

  # worker: record instance starts; move jobs an AZ without GPU capacity cannot start to another
  # instance's ledger item (UpdateItem: placed set), so no stop misses them.
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:Query", "dynamodb:UpdateItem"]
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

  # worker (ssm): run the batchworker run-job document, and no other document.
  dynamic "statement" {
    for_each = local.use_ssm ? ["SendRunJobDocument"] : []

    content {
      sid       = statement.value
      actions   = ["ssm:SendCommand"]
      resources = [aws_ssm_document.run_job.arn]
    }
  }

  # worker (ssm): send that command only to instances of this pool (ssm:resourceTag on the instance).
  dynamic "statement" {
    for_each = local.use_ssm ? ["SendCommandToPoolInstances"] : []

    content {
      sid       = statement.value
      actions   = ["ssm:SendCommand"]
      resources = [local.instance_arn_pattern]

      condition {
        test     = "StringEquals"
        variable = "ssm:resourceTag/batchworker:pool"
        values   = [var.name_prefix]
      }
    }
  }

  # worker (ssm): wait for the agent (PingStatus Online), read the launcher's reply, cancel a command
  # that overran its deadline. None of these has resource-level permissions.
  dynamic "statement" {
    for_each = local.use_ssm ? ["FollowCommands"] : []

    content {
      sid       = statement.value
      actions   = ["ssm:DescribeInstanceInformation", "ssm:GetCommandInvocation", "ssm:CancelCommand"]
      resources = ["*"]
    }
  }

  # worker (ssh): read the endpoint and host key each instance published, and its own login key.
  dynamic "statement" {
    for_each = local.use_ssh ? ["ReadSshParameters"] : []

    content {
      sid     = statement.value
      actions = ["ssm:GetParameter"]
      resources = [
        "arn:${local.partition}:ssm:${var.region}:${local.account_id}:parameter${local.ssh_endpoint_pattern}",
        "${local.parameter_arn_prefix}/ssh/private-key",
      ]
    }
  }

  # worker (ssh): decrypt the SecureString login key (aws/ssm key, only through SSM).
  dynamic "statement" {
    for_each = local.use_ssh ? ["DecryptSshKey"] : []

    content {
      sid       = statement.value
      actions   = ["kms:Decrypt"]
      resources = ["*"]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${var.region}.amazonaws.com"]
      }
    }
  }

  # worker: write a failed manifest for a job it cannot start (so stop learns of it).
  statement {
    sid       = "WriteFailedManifests"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # worker: Lambda sends an asynchronous invocation that failed all its retries to the worker's
  # dead-letter queue (on-failure destination), with the function's role.
  statement {
    sid       = "DeadLetterQueue"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.worker_dlq.arn]
  }

  # worker (in a VPC, lambda_subnet_ids set): Lambda manages the function's network interfaces with its
  # role (as AWSLambdaVPCAccessExecutionRole; these actions take no useful resource scoping).
  dynamic "statement" {
    for_each = local.worker_in_vpc ? ["VpcNetworkInterfaces"] : []

    content {
      sid = statement.value
      actions = [
        "ec2:CreateNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DeleteNetworkInterface",
        "ec2:AssignPrivateIpAddresses",
        "ec2:UnassignPrivateIpAddresses",
      ]
      resources = ["*"]
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

  # stop: record the instance stops it requests; read the instance's ledger item, note the job's end in
  # it and claim the stop with a conditional update (GetItem, UpdateItem).
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:Query", "dynamodb:GetItem", "dynamodb:UpdateItem"]
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

data "aws_iam_policy_document" "reaper" {
  # reaper: find active jobs by status, fail lost or overlong ones, re-queue stuck ones.
  statement {
    sid       = "JobsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Query"]
    resources = local.jobs_table_arns
  }

  # reaper: read the pool's ledger items in one batch (BatchGetItem, one call per pass whatever the pool
  # size), claim stops (conditional update), release placements that ended unrecorded (UpdateItem), record
  # the stops it requests.
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:Query", "dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"]
    resources = local.instance_events_table_arns
  }

  # reaper: find running pool instances (Describe* has no resource-level permissions).
  statement {
    sid       = "DescribeInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }

  # reaper: stop an idle instance, only one of this pool.
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

  # reaper: write the failed manifest of a job it gives up on (so stop and the client learn of it).
  statement {
    sid       = "WriteFailedManifests"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # reaper: before re-running or failing a job whose lease lapsed, read the manifest it may have written
  # (its event can be late): a finished job is never dispatched again. ListBucket makes a missing manifest
  # read as 404 rather than 403.
  statement {
    sid       = "ReadManifests"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # reaper: tell a manifest not written yet (404) from a denied read (403); see ReadManifests.
  statement {
    sid       = "ListOutputJobs"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["output"].arn]
  }

  # reaper: hand a stuck job to the worker (dispatcher) function again, asynchronously.
  statement {
    sid       = "InvokeWorker"
    actions   = ["lambda:InvokeFunction"]
    resources = [local.worker_function_arn]
  }

  # reaper: write its own logs.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda["reaper"].arn}:*"]
  }
}

################################################################################
# GPU instance role: the job reads its input and the model and writes results; user data installs
# the job package and (ssh) publishes the instance's own endpoint; (ssm) the agent takes commands.
################################################################################

data "aws_iam_policy_document" "gpu_assume" {
  # EC2 service: assume the instance role (instance profile).
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "gpu" {
  name               = "${var.name_prefix}-gpu${local.global_name_suffix}"
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

  # instance (job): download the job package archive a job is pinned to (content-addressed,
  # job-packages/<name>/<sha256>.tar.gz; pointers and configs stay unreadable to it).
  statement {
    sid       = "ReadJobPackageArchives"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["artifacts"].arn}/job-packages/*.tar.gz"]
  }

  # instance (job): upload predictions, job.log and manifest.json under jobs/<job_id>/.
  statement {
    sid       = "WriteResults"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # instance (job): renew the job's lease while it runs (worker/lease.py: status, lease_expires_at,
  # updated_at, running_since, and items_done/items_total for progress, of the job's item, conditional on
  # it being dispatched or running). Only
  # UpdateItem, and only on those attributes: the instance cannot read or create jobs.
  statement {
    sid       = "RenewJobLease"
    actions   = ["dynamodb:UpdateItem"]
    resources = [aws_dynamodb_table.jobs.arn]

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "dynamodb:Attributes"
      values   = local.job_lease_attributes
    }
  }

  # instance (user data): read the pointer to the current job package.
  statement {
    sid       = "ReadJobPackagePointer"
    actions   = ["ssm:GetParameter"]
    resources = ["${local.parameter_arn_prefix}/job-package"]
  }

  # instance (user data): download the job package at the S3 version the pointer pins.
  statement {
    sid       = "ReadJobPackage"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${aws_s3_bucket.this["artifacts"].arn}/packages/*"]
  }

  # instance (user data, ssh): publish its own SSH endpoint and host key for the worker function.
  # One statement per instance: the parameter of instance i, only for requests from instance i.
  dynamic "statement" {
    for_each = local.use_ssh ? aws_instance.gpu[*].id : []

    content {
      sid       = "PublishOwnSshEndpoint${statement.key}"
      actions   = ["ssm:PutParameter"]
      resources = ["${local.parameter_arn_prefix}/instances/${statement.value}/ssh-endpoint"]

      condition {
        test     = "StringEquals"
        variable = "ec2:SourceInstanceARN"
        values   = ["arn:${local.partition}:ec2:${var.region}:${local.account_id}:instance/${statement.value}"]
      }
    }
  }

  # instance (SSM agent, ssm): register and heartbeat (PingStatus Online) and take Run Command messages.
  # The minimal part of AmazonSSMManagedInstanceCore: that managed policy also grants ssm:GetParameter(s)
  # on every parameter of the account, which this role must not have. These take no resource scoping.
  dynamic "statement" {
    for_each = local.use_ssm ? ["SsmAgentCore"] : []

    content {
      sid = statement.value
      actions = [
        "ssm:UpdateInstanceInformation",
        "ec2messages:AcknowledgeMessage",
        "ec2messages:DeleteMessage",
        "ec2messages:FailMessage",
        "ec2messages:GetEndpoint",
        "ec2messages:GetMessages",
        "ec2messages:SendReply",
        "ssmmessages:CreateControlChannel",
        "ssmmessages:CreateDataChannel",
        "ssmmessages:OpenControlChannel",
        "ssmmessages:OpenDataChannel",
      ]
      resources = ["*"]
    }
  }

  # instance (SSM agent, ssm): upload Run Command stdout/stderr under ssm-output/ of the output bucket
  # (the agent sets the bucket-owner-full-control ACL, hence PutObjectAcl).
  dynamic "statement" {
    for_each = local.use_ssm ? ["WriteCommandOutput"] : []

    content {
      sid       = statement.value
      actions   = ["s3:PutObject", "s3:PutObjectAcl"]
      resources = [local.ssm_output_arn]
    }
  }

  # instance (SSM agent, ssm): check the output bucket's encryption before uploading to it.
  dynamic "statement" {
    for_each = local.use_ssm ? ["ReadOutputBucketEncryption"] : []

    content {
      sid       = statement.value
      actions   = ["s3:GetEncryptionConfiguration"]
      resources = [aws_s3_bucket.this["output"].arn]
    }
  }
}

resource "aws_iam_role_policy" "gpu" {
  name   = "${var.name_prefix}-gpu"
  role   = aws_iam_role.gpu.id
  policy = data.aws_iam_policy_document.gpu.json
}

resource "aws_iam_instance_profile" "gpu" {
  name = "${var.name_prefix}-gpu${local.global_name_suffix}"
  role = aws_iam_role.gpu.name
}
