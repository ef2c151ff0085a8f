################################################################################
# Job table: one item per job (hash job_id). status-shard-index lists jobs by status, oldest first: its
# partition key is "<status>#<shard>" (2 shards a status, from the job id: batchworker/jobs.py), so no
# partition takes more than its share of the writes; it leaves out what lease renewals write (lease,
# progress), so renewals never write to it.
################################################################################

resource "aws_dynamodb_table" "jobs" {
  #checkov:skip=CKV_AWS_119:Encrypted at rest with the AWS managed key aws/dynamodb (server_side_encryption on); a CMK adds a key policy and cost.
  name         = "${var.name_prefix}-jobs"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "job_id"

  attribute {
    name = "job_id"
    type = "S"
  }

  attribute {
    name = "status_shard"
    type = "S"
  }

  attribute {
    name = "created_at"
    type = "S"
  }

  global_secondary_index {
    name            = "status-shard-index"
    hash_key        = "status_shard"
    range_key       = "created_at"
    projection_type = "INCLUDE"
    non_key_attributes = [
      "status", "input_bucket", "input_key", "input_version", "input_size_bytes", "instance_id", "updated_at",
      "attempts", "retries", "running_since", "last_error", "manifest_key", "placed_at", "waiting_reason",
      "capacity_wait_since", "package_name", "package_version", "package_uri", "params",
    ]
  }

  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

################################################################################
# Instance events: state changes of the GPU instances (hash instance_id, range at).
################################################################################

resource "aws_dynamodb_table" "instance_events" {
  #checkov:skip=CKV_AWS_119:Encrypted at rest with the AWS managed key aws/dynamodb (server_side_encryption on); a CMK adds a key policy and cost.
  name         = "${var.name_prefix}-instance-events"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "instance_id"
  range_key    = "at"

  attribute {
    name = "instance_id"
    type = "S"
  }

  attribute {
    name = "at"
    type = "S"
  }

  # Start/stop events expire after job_retention_days (InstanceHistory writes expires_at); the per-instance
  # ledger and the pool's idle-gap record carry no expires_at and stay.
  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}
