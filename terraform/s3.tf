################################################################################
# Buckets: input (uploads start jobs), output (results + manifest.json), artifacts (models)
################################################################################

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV2_AWS_6:Every bucket has a public access block: aws_s3_bucket_public_access_block.this (for_each, not followed by checkov).
  #checkov:skip=CKV_AWS_21:Input and artifacts are versioned (aws_s3_bucket_versioning.this); output holds write-once jobs/<job_id>/ results that expire.
  #checkov:skip=CKV2_AWS_61:Every bucket has a lifecycle configuration: aws_s3_bucket_lifecycle_configuration.this (for_each, not followed by checkov).
  #checkov:skip=CKV2_AWS_62:Input and output notify SQS (aws_s3_bucket_notification); artifacts (models, job packages) has no consumer for events.
  #checkov:skip=CKV_AWS_18:Server access logs need a fourth bucket nobody reads here; use CloudTrail S3 data events account-wide if required.
  #checkov:skip=CKV_AWS_144:Cross-region replication of short-lived inputs and results doubles storage cost for no recovery need.
  #checkov:skip=CKV_AWS_145:SSE-S3 (AES256) is on for every bucket; a KMS key adds per-request cost and key policy to every reader.
  for_each = toset(["input", "output", "artifacts"])

  bucket        = local.bucket_names[each.key]
  force_destroy = var.force_destroy_buckets
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each = aws_s3_bucket.this

  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# Input: a re-upload under the same key is a new job; versions keep the one each job read.
# Artifacts: keep previous models.
resource "aws_s3_bucket_versioning" "this" {
  for_each = { for name, bucket in aws_s3_bucket.this : name => bucket if name != "output" }

  bucket = each.value.id

  versioning_configuration {
    status = "Enabled"
  }
}

# Input and output: objects expire after object_expiry_days. Artifacts (models, job packages): only
# replaced versions expire. Everywhere: old versions and abandoned multipart uploads go away.
resource "aws_s3_bucket_lifecycle_configuration" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id

  rule {
    id     = "expire-objects"
    status = "Enabled"

    filter {}

    dynamic "expiration" {
      for_each = each.key == "artifacts" ? [] : [var.object_expiry_days]

      content {
        days = expiration.value
      }
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiry_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

data "aws_iam_policy_document" "tls_only" {
  for_each = aws_s3_bucket.this

  # Everyone (deny): refuse plain-HTTP requests to the bucket and its objects.
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [each.value.arn, "${each.value.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  for_each = var.tls_only_bucket_policy ? aws_s3_bucket.this : {}

  bucket = each.value.id
  policy = data.aws_iam_policy_document.tls_only[each.key].json

  depends_on = [aws_s3_bucket_public_access_block.this]
}

################################################################################
# Events: input ObjectCreated -> jobs queue; output manifest.json -> done queue
################################################################################

resource "aws_s3_bucket_notification" "input" {
  bucket = aws_s3_bucket.this["input"].id

  queue {
    id        = "jobs"
    queue_arn = aws_sqs_queue.jobs.arn
    events    = ["s3:ObjectCreated:*"]
  }

  depends_on = [aws_sqs_queue_policy.jobs]
}

resource "aws_s3_bucket_notification" "output" {
  bucket = aws_s3_bucket.this["output"].id

  # manifest.json is always the last object a job writes.
  queue {
    id            = "done"
    queue_arn     = aws_sqs_queue.done.arn
    events        = ["s3:ObjectCreated:*"]
    filter_suffix = "manifest.json"
  }

  depends_on = [aws_sqs_queue_policy.done]
}

################################################################################
# Artifacts: the job wheel the instances install and the bundled default job package
################################################################################

# Versioned key (packages/batchworker_job-<version>-py3-none-any.whl) in a versioned bucket; the
# instances find it through aws_ssm_parameter.job_package, which also pins the S3 version and sha256.
resource "aws_s3_object" "job_package" {
  bucket = aws_s3_bucket.this["artifacts"].id
  key    = local.job_package_key
  source = "${local.job_package_dir}/${local.job_package.wheel}"
  etag   = filemd5("${local.job_package_dir}/${local.job_package.wheel}")

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.this, aws_s3_bucket_versioning.this]
}

# The default job package (docs/jobs.md): its archive and config under their content address, and
# bundled.json, the version the trigger runs while no `batchworker job deploy` of that name made a
# pointer (current.json, which Terraform never touches). All three are immutable for one build.
resource "aws_s3_object" "default_job" {
  for_each = local.default_job_bundle_files

  bucket       = aws_s3_bucket.this["artifacts"].id
  key          = "job-packages/${local.default_job_bundle.name}/${each.key}"
  source       = "${local.default_job_bundle_dir}/${each.key}"
  etag         = filemd5("${local.default_job_bundle_dir}/${each.key}")
  content_type = each.value

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.this, aws_s3_bucket_versioning.this]
}
