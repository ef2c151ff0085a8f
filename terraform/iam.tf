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
  job_lease_attributes = ["job_id", "status", "status_shard", "lease_expires_at", "updated_at", "running_since", "items_done", "items_total", "instance_problem"]

  # The customer-managed EBS key, when the account encrypts volumes with one (roles that start instances).
  ebs_kms_key_arns = var.ebs_kms_key_id == null ? [] : [var.ebs_kms_key_id]

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

# The roles that start instances (trigger, worker) share these grants.
data "aws_iam_policy_document" "start_encrypted_instances" {
  # trigger, worker: start an instance whose root volume is encrypted with the customer-managed key ebs_kms_key_id
  # (EBS creates a grant and decrypts the volume's data key on the caller's behalf; without these the
  # instance goes pending -> stopped). Only when ebs_kms_key_id is set.
  dynamic "statement" {
    for_each = local.ebs_kms_key_arns

    content {
      sid       = "EbsKeyGrant"
      actions   = ["kms:CreateGrant"]
      resources = [statement.value]

      condition {
        test     = "Bool"
        variable = "kms:GrantIsForAWSResource"
        values   = ["true"]
      }
    }
  }

  # trigger, worker: decrypt with ebs_kms_key_id, only through EC2 (see EbsKeyGrant).
  dynamic "statement" {
    for_each = local.ebs_kms_key_arns

    content {
      sid       = "EbsKeyDecrypt"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ec2.${var.region}.amazonaws.com"]
      }
    }
  }
}

data "aws_iam_policy_document" "trigger" {
  source_policy_documents = [data.aws_iam_policy_document.start_encrypted_instances.json]

  # trigger: consume S3 upload events from the jobs queue (event source mapping).
  # unexercised (sqs:GetQueueAttributes): Lambda's event source mapping reads the queue with it on AWS; the local poller does not.
  statement {
    sid       = "ConsumeJobsQueue"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.jobs.arn]
  }

  # trigger: record jobs as QUEUED (idempotent put) and the instance each is placed on. It never reads the
  # status index: placement counts jobs in the instances' ledger items.
  # unexercised (dynamodb:GetItem): reads the job on a duplicate delivery of its upload event (only the soak sends one).
  statement {
    sid       = "JobsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"]
    resources = [aws_dynamodb_table.jobs.arn]
  }

  # trigger: record the instance starts it requests, read the pool's ledger items once per batch
  # (BatchGetItem: each instance's placed jobs), place each job with a conditional update of its
  # instance's ledger item (UpdateItem: refused when the instance is full), which voids a stop claimed
  # before it, and read the pool's idle-gap record (GetItem, IdleGaps.note_arrival) before placing a batch.
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"]
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

  # trigger: read an upload's version id when the event lacks it, and its param-* metadata at the event's
  # version (HeadObject needs s3:GetObject, with VersionId s3:GetObjectVersion).
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
  # unexercised: Lambda writes the function\'s CloudWatch logs with this role on AWS; the local runtime writes files.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda["trigger"].arn}:*"]
  }
}

data "aws_iam_policy_document" "worker" {
  source_policy_documents = [data.aws_iam_policy_document.start_encrypted_instances.json]

  # worker: read the job and move it to RUNNING (or FAILED when dispatch fails); BatchGetItem: the dispatcher
  # holding an instance reads every job placed on it at once (batchworker/control.py dispatch_instance).
  statement {
    sid       = "JobsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:BatchGetItem"]
    resources = local.jobs_table_arns
  }

  # worker: record instance starts; claim the instance's ledger item as its one dispatcher, or hand jobs over
  # to the one there (UpdateItem, conditional); move jobs an AZ without GPU capacity cannot start to another
  # instance's ledger item (placed set), so no stop misses them, choosing the least loaded from the
  # candidates' ledger items (BatchGetItem); GetItem: on a state-change event, whether any job is placed on
  # the instance at all.
  # unexercised (dynamodb:PutItem): only when the worker starts an instance itself (stopped between placement and dispatch).
  # unexercised (dynamodb:BatchGetItem): only when an AZ has no GPU capacity (tests/functional/test_capacity.py).
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:GetItem", "dynamodb:BatchGetItem"]
    resources = local.instance_events_table_arns
  }

  # worker: wait until the instance is running (Describe* has no resource-level permissions).
  statement {
    sid       = "DescribeInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }

  # worker: start the instance again if it was stopped meanwhile, only one of this pool.
  # unexercised: only when the instance stopped between placement and dispatch (the backlog test).
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

  # worker (ssh): decrypt the SecureString login key (aws/ssm key, only through SSM; keys of this account
  # and region: the aws/ssm key's id differs per account).
  dynamic "statement" {
    for_each = local.use_ssh ? ["DecryptSshKey"] : []

    content {
      sid       = statement.value
      actions   = ["kms:Decrypt"]
      resources = ["arn:${local.partition}:kms:${var.region}:${local.account_id}:key/*"]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${var.region}.amazonaws.com"]
      }
    }
  }

  # worker: write a failed manifest for a job it cannot start (so stop learns of it).
  # unexercised: no integration test makes a dispatch fail (tests/functional inject the faults).
  statement {
    sid       = "WriteFailedManifests"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # worker: Lambda sends an asynchronous invocation that failed all its retries to the worker's
  # dead-letter queue (on-failure destination), with the function's role.
  # unexercised: only Lambda itself sends there, after an invocation failed every retry; the local runtime drops it.
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
  # unexercised: Lambda writes the function\'s CloudWatch logs with this role on AWS; the local runtime writes files.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda["worker"].arn}:*"]
  }
}

data "aws_iam_policy_document" "stop" {
  # stop: consume manifest.json events from the done queue (event source mapping).
  # unexercised (sqs:GetQueueAttributes): Lambda's event source mapping reads the queue with it on AWS; the local poller does not.
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

  # stop: S3 answers a read of a missing object with 404 (NoSuchKey) only to a caller that may list the
  # bucket, else 403: without it the "manifest gone" branch never runs and the record is retried to the DLQ.
  # A prefix condition does not count for that implicit check, so it is bucket-wide (output keys only).
  statement {
    sid       = "MissingManifestIs404"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["output"].arn]
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
    actions   = ["dynamodb:PutItem", "dynamodb:GetItem", "dynamodb:UpdateItem"]
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
  # unexercised: Lambda writes the function\'s CloudWatch logs with this role on AWS; the local runtime writes files.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda["stop"].arn}:*"]
  }
}

data "aws_iam_policy_document" "reaper" {
  # reaper: find active jobs by status (Query on the status index), read them with their leases
  # (BatchGetItem, 100 a call), re-read one (GetItem), fail lost or overlong ones, re-queue stuck ones.
  statement {
    sid       = "JobsTable"
    actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem", "dynamodb:Query"]
    resources = local.jobs_table_arns
  }

  # reaper: read the pool's ledger items in one batch (BatchGetItem, one call per pass whatever the pool
  # size), claim stops (conditional update), release placements that ended unrecorded (UpdateItem), record
  # the stops it requests.
  # unexercised (dynamodb:GetItem): single ledger and idle-gap reads (InstanceLedger.read, IdleGaps) the reaper's pass rarely reaches.
  statement {
    sid       = "InstanceEventsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"]
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
  # unexercised: the integration tests allow one attempt per job, so the reaper fails stuck jobs instead.
  statement {
    sid       = "InvokeWorker"
    actions   = ["lambda:InvokeFunction"]
    resources = [local.worker_function_arn]
  }

  # reaper: write its own logs.
  # unexercised: Lambda writes the function\'s CloudWatch logs with this role on AWS; the local runtime writes files.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda["reaper"].arn}:*"]
  }
}

################################################################################
# GPU instance role: the job reads its input and its job package and writes results; user data installs
# the instance runtime (the batchworker_job wheel) and (ssh) publishes the instance's own endpoint; (ssm) the agent takes commands.
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
  # unexercised (s3:GetObject): an input without a version id (versioning suspended) is read unversioned.
  statement {
    sid       = "ReadInputs"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${aws_s3_bucket.this["input"].arn}/*"]
  }

  # instance (job): download the job package archive a job is pinned to (content-addressed,
  # job-packages/<name>/<sha256>.tar.gz); instance (prewarm): read the default job's pointer
  # (current.json, else Terraform's bundled.json) to prepare that version at boot. Configs stay unread.
  statement {
    sid     = "ReadJobPackageArchives"
    actions = ["s3:GetObject"]
    resources = [
      "${aws_s3_bucket.this["artifacts"].arn}/job-packages/*.tar.gz",
      "${aws_s3_bucket.this["artifacts"].arn}/job-packages/*/current.json",
      "${aws_s3_bucket.this["artifacts"].arn}/job-packages/*/bundled.json",
    ]
  }

  # instance (job): upload results.csv, errors.jsonl, outputs/, job.log and manifest.json under jobs/<job_id>/.
  statement {
    sid       = "WriteResults"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # instance (job): renew the job's lease while it runs (worker/lease.py: lease_expires_at, and
  # items_done/items_total for progress; as its code starts, status, status_shard, running_since and
  # updated_at; of the job's item, conditional on it being dispatched or running), and say on it which
  # service the instance cannot reach (instance_problem, shown by `batchworker status`). Only
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

  # instance (prewarm): learn that the default job has no deploy pointer (current.json; then it reads
  # Terraform's bundled.json): without s3:ListBucket S3 answers the GetObject of a missing key with 403,
  # an AccessDenied at every boot. Only when the instance was started by another package's job.
  # unexercised: the integration tests start instances with default-job uploads (the pointer is not read).
  statement {
    sid       = "ListJobPackagePointers"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["artifacts"].arn]
  }

  # instance (prewarm): read which job packages started it: the `prewarm` attribute the trigger writes
  # on the instance's ledger item at the start (worker/prewarm.py sets them up at boot). GetItem with a
  # projection of that attribute only: no other attribute of the table (history, placements) is readable.
  statement {
    sid       = "ReadPrewarmPackages"
    actions   = ["dynamodb:GetItem"]
    resources = [aws_dynamodb_table.instance_events.arn]

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "dynamodb:Attributes"
      values   = ["instance_id", "at", "prewarm"]
    }

    condition {
      test     = "StringEqualsIfExists"
      variable = "dynamodb:Select"
      values   = ["SPECIFIC_ATTRIBUTES"]
    }
  }

  # instance (user data): read the pointer to the current job package.
  # unexercised: user data runs at boot on AWS; the local instance host runs the job from the repository's venv.
  statement {
    sid       = "ReadJobPackagePointer"
    actions   = ["ssm:GetParameter"]
    resources = ["${local.parameter_arn_prefix}/job-package"]
  }

  # instance (user data): download the job package at the S3 version the pointer pins.
  # unexercised: user data runs at boot on AWS; the local instance host runs the job from the repository's venv.
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

################################################################################
# Ready-made policies for people: attach client_policy_json to whoever only submits and downloads,
# operator_policy_json to whoever runs the CLI's operator commands. Not attached to anything here.
################################################################################

data "aws_iam_policy_document" "client" {
  # client: `batchworker submit` (or any S3 upload) puts inputs into the input bucket; each starts a job.
  statement {
    sid       = "UploadInputs"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.this["input"].arn}/*"]
  }

  # client: `results` and `submit --wait` list one job's outputs (jobs/<job_id>/), never the whole bucket.
  statement {
    sid       = "ListJobOutputs"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["output"].arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["jobs/j-*/"]
    }
  }

  # client: `results` and `logs` download a job's outputs, job.log and manifest.json.
  statement {
    sid       = "ReadJobOutputs"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # client: `status` reads jobs (one by id, or all of them).
  statement {
    sid       = "ReadJobs"
    actions   = ["dynamodb:GetItem", "dynamodb:Scan"]
    resources = [aws_dynamodb_table.jobs.arn]
  }

  # client: `status` lists the pool's instances and their states (Describe* has no resource-level permissions).
  statement {
    sid       = "DescribeInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }
}

data "aws_iam_policy_document" "operator" {
  # operator: `report` and `dashboard` read every job: all of them (Scan), by status (the status index),
  # one by id, a page of them with their progress (BatchGetItem).
  statement {
    sid       = "ReadJobs"
    actions   = ["dynamodb:Scan", "dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"]
    resources = [aws_dynamodb_table.jobs.arn, "${aws_dynamodb_table.jobs.arn}/index/*"]
  }

  # operator: `report` and `dashboard` read each instance's start/stop history.
  statement {
    sid       = "ReadInstanceEvents"
    actions   = ["dynamodb:Query"]
    resources = [aws_dynamodb_table.instance_events.arn]
  }

  # operator: `report` and `dashboard` list the pool's instances (Describe* has no resource-level permissions).
  statement {
    sid       = "DescribeInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }

  # operator: `dashboard` lists a job's outputs, and reads a missing manifest as 404 (not 403): bucket-wide,
  # as an operator sees every job anyway.
  statement {
    sid       = "ListOutputs"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["output"].arn]
  }

  # operator: `dashboard` shows a job's manifest, log and results.
  statement {
    sid       = "ReadJobOutputs"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["output"].arn}/jobs/*"]
  }

  # operator: `dashboard` previews a job's input.
  statement {
    sid       = "PreviewInputs"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["input"].arn}/*"]
  }

  # operator: `dashboard` shows the depth of every queue of the deployment.
  statement {
    sid     = "ReadQueues"
    actions = ["sqs:GetQueueUrl", "sqs:GetQueueAttributes"]
    resources = [
      aws_sqs_queue.jobs.arn, aws_sqs_queue.jobs_dlq.arn, aws_sqs_queue.done.arn, aws_sqs_queue.done_dlq.arn,
      aws_sqs_queue.worker_dlq.arn,
    ]
  }

  # operator: `job deploy`, `job list`, `job rollback` read and write the package registry (archives,
  # configs, the conditional pointer moves) under job-packages/ of the artifacts bucket.
  statement {
    sid       = "ManageJobPackages"
    actions   = ["s3:GetObject", "s3:PutObject"]
    resources = ["${aws_s3_bucket.this["artifacts"].arn}/job-packages/*"]
  }

  # operator: `job list` lists package names, and a missing pointer or archive must read as 404 (not 403):
  # bucket-wide (the artifacts bucket holds only the runtime wheel and the job packages).
  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["artifacts"].arn]
  }

  # operator: `dashboard` peeks at dead letters (ReceiveMessage with VisibilityTimeout 0; never deletes).
  # unexercised: only when a dead-letter queue holds messages; none does in the integration tests.
  statement {
    sid       = "PeekDeadLetters"
    actions   = ["sqs:ReceiveMessage"]
    resources = [aws_sqs_queue.jobs_dlq.arn, aws_sqs_queue.done_dlq.arn, aws_sqs_queue.worker_dlq.arn]
  }
}
