################################################################################
# Provider and naming
################################################################################

variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-east-1"
}

variable "aws_endpoint_url" {
  description = "Single endpoint for every AWS service (the local cloud's moto server, e.g. http://127.0.0.1:5000). Null deploys to real AWS."
  type        = string
  default     = null
}

variable "name_prefix" {
  description = "Prefix of every resource name; also the value of the batchworker:pool discovery tag and the SSM parameter prefix (/<name_prefix>)."
  type        = string
  default     = "batchworker"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name_prefix))
    error_message = "The name_prefix must match ^[a-z][a-z0-9-]{1,30}$ (it is part of S3 bucket names)."
  }
}

variable "tags" {
  description = "Tags applied to every resource through the provider's default_tags."
  type        = map(string)
  default     = {}
}

################################################################################
# S3 and the model
################################################################################

variable "tls_only_bucket_policy" {
  description = "Attach a bucket policy denying requests that do not use TLS. Keep true on AWS; the local cloud sets false (moto answers 403 to every object request under it)."
  type        = bool
  default     = true
}

variable "object_expiry_days" {
  description = "Days after which objects in the input and output buckets expire."
  type        = number
  default     = 30

  validation {
    condition     = var.object_expiry_days >= 1
    error_message = "The object_expiry_days must be at least 1."
  }
}

variable "force_destroy_buckets" {
  description = "Let terraform destroy delete the buckets together with their objects and versions."
  type        = bool
  default     = false
}

variable "model_source_path" {
  description = "Local TorchScript file uploaded to s3://<artifacts bucket>/models/digits-cnn.pt. Null means <module>/../build/model/digits-cnn.pt. Unused when model_uri is set."
  type        = string
  default     = null
}

variable "model_uri" {
  description = "s3://bucket/key of a TorchScript model to use instead of the bundled digits CNN. Null uploads and uses the bundled model."
  type        = string
  default     = null

  validation {
    condition     = var.model_uri == null || can(regex("^s3://[^/]+/.+$", var.model_uri))
    error_message = "The model_uri must look like s3://bucket/key."
  }
}

################################################################################
# Queues
################################################################################

variable "max_receive_count" {
  description = "Deliveries of a message before SQS moves it to the queue's dead-letter queue."
  type        = number
  default     = 5

  validation {
    condition     = var.max_receive_count >= 1
    error_message = "The max_receive_count must be at least 1."
  }
}

################################################################################
# Lambda functions
################################################################################

variable "lambda_build_dir" {
  description = "Directory holding trigger.zip, worker.zip and stop.zip (scripts/build_lambdas.py). Null means <module>/../build/lambdas."
  type        = string
  default     = null
}

variable "event_source_batch_size" {
  description = "Maximum number of SQS messages per invocation of the trigger and stop functions."
  type        = number
  default     = 10

  validation {
    condition     = var.event_source_batch_size >= 1 && var.event_source_batch_size <= 10000
    error_message = "The event_source_batch_size must be between 1 and 10000."
  }
}

variable "event_source_mappings_enabled" {
  description = "Enable the SQS event source mappings. The local cloud sets false: its own runtime polls the queues (moto's mappings do not run the code)."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Retention of the Lambda functions' CloudWatch log groups, in days."
  type        = number
  default     = 14
}

variable "instance_ready_timeout_seconds" {
  description = "How long the worker function waits for an instance to be running and accept SSH. Must stay below the worker function's 900 s timeout."
  type        = number
  default     = 600

  validation {
    condition     = var.instance_ready_timeout_seconds > 0 && var.instance_ready_timeout_seconds < 900
    error_message = "The instance_ready_timeout_seconds must be greater than 0 and less than 900 (the worker function's timeout)."
  }
}

variable "ssh_user" {
  description = "Login user on the GPU instance (ubuntu on the Deep Learning AMI)."
  type        = string
  default     = "ubuntu"
}

variable "job_command" {
  description = "Fixed command the worker function runs on the instance over SSH; it reads the job spec from stdin."
  type        = string
  default     = "/opt/batchworker/venv/bin/batchworker-job launch"
}

################################################################################
# GPU instances
################################################################################

variable "ami_id" {
  description = "AMI of the GPU instances. Null picks the newest AWS Deep Learning OSS Nvidia Driver PyTorch AMI (Ubuntu 22.04, x86_64)."
  type        = string
  default     = null
}

variable "instance_type" {
  description = "EC2 instance type of the GPU instances."
  type        = string
  default     = "g4dn.xlarge"
}

variable "instance_count" {
  description = "Number of GPU instances in the pool (created, then left stopped)."
  type        = number
  default     = 1

  validation {
    condition     = var.instance_count >= 1
    error_message = "The instance_count must be at least 1."
  }
}

variable "key_name" {
  description = "Optional EC2 key pair for operator SSH access. The worker function uses the key in SSM, not this one."
  type        = string
  default     = null
}

variable "ssh_allowed_cidrs" {
  description = "CIDR blocks allowed to reach the GPU instances on port 22. Empty means no ingress at all."
  type        = list(string)
  default     = []
}

variable "subnet_id" {
  description = "Subnet of the GPU instances. Null uses the default VPC's default subnet."
  type        = string
  default     = null
}

variable "user_data" {
  description = "Optional cloud-init user data of the GPU instances (installs the job, publishes /<name_prefix>/instances/<id>/ssh-endpoint)."
  type        = string
  default     = null
}
