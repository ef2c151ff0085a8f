################################################################################
# Buckets: input (uploads start jobs), output (results + manifest.json), artifacts (models)
################################################################################

resource "aws_s3_bucket" "this" {
  for_each = toset(["input", "output", "artifacts"])

  bucket        = "${var.name_prefix}-${each.key}-${local.account_id}"
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

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  for_each = { for name, bucket in aws_s3_bucket.this : name => bucket if name != "artifacts" }

  bucket = each.value.id

  rule {
    id     = "expire-objects"
    status = "Enabled"

    filter {}

    expiration {
      days = var.object_expiry_days
    }

    noncurrent_version_expiration {
      noncurrent_days = var.object_expiry_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

data "aws_iam_policy_document" "tls_only" {
  for_each = aws_s3_bucket.this

  # Everyone: refuse plain-HTTP requests to the bucket and its objects.
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
# The bundled model
################################################################################

resource "aws_s3_object" "model" {
  count = var.model_uri == null ? 1 : 0

  bucket = aws_s3_bucket.this["artifacts"].id
  key    = local.model_key
  source = local.model_source_path
  etag   = filemd5(local.model_source_path)

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.this]
}
