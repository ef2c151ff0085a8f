################################################################################
# Provider and naming
################################################################################

variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "The region must be an AWS region name such as us-east-1."
  }
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
    # Part of S3 bucket names (lower case, digits, hyphens) and of the SSM document name (which may not
    # start with "aws" or "amazon").
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name_prefix)) && !can(regex("^(aws|amazon)", var.name_prefix))
    error_message = "The name_prefix must match ^[a-z][a-z0-9-]{1,30}[a-z0-9]$ and must not start with \"aws\" or \"amazon\" (it is part of bucket and SSM document names)."
  }
}

variable "tags" {
  description = "Tags applied to every resource through the provider's default_tags (and to the instances' volumes and network interfaces)."
  type        = map(string)
  default     = {}

  validation {
    condition     = !contains(keys(var.tags), "batchworker:pool")
    error_message = "The tags must not set batchworker:pool: that discovery tag belongs to the GPU instances only and is set from name_prefix."
  }
}

################################################################################
# S3
################################################################################

variable "tls_only_bucket_policy" {
  description = "Attach a bucket policy denying requests that do not use TLS. Keep true on AWS; the local cloud sets false (moto answers 403 to every object request under it)."
  type        = bool
  default     = true
}

variable "object_expiry_days" {
  description = "Days after which objects in the input and output buckets expire (results, job logs and SSM command output included)."
  type        = number
  default     = 30

  validation {
    condition     = var.object_expiry_days >= 1 && floor(var.object_expiry_days) == var.object_expiry_days
    error_message = "The object_expiry_days must be a whole number of at least 1."
  }
}

variable "noncurrent_version_expiry_days" {
  description = "Days after which replaced object versions expire in the versioned buckets (input, artifacts: earlier models and job packages)."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiry_days >= 1 && floor(var.noncurrent_version_expiry_days) == var.noncurrent_version_expiry_days
    error_message = "The noncurrent_version_expiry_days must be a whole number of at least 1."
  }
}

variable "force_destroy_buckets" {
  description = "Let terraform destroy delete the buckets together with their objects and versions."
  type        = bool
  default     = false
}

variable "default_job" {
  description = "Job package that runs every upload outside a `<name>/` folder of a deployed package (docs/jobs.md); \"digits\" is the bundled digits classifier (make build ships it). Empty: only `<name>/` uploads run; others fail at once with a manifest saying so."
  type        = string
  default     = "digits"

  validation {
    condition     = can(regex("^([a-z][a-z0-9-]{0,39})?$", var.default_job))
    error_message = "The default_job must be empty or a job package name: a lowercase letter, then up to 39 lowercase letters, digits or '-'."
  }
}

variable "default_job_bundle_dir" {
  description = "Directory holding the default job package built by scripts/bundle_default_job.py (make build). Null means <module>/../build/default-job; nothing is uploaded when it holds no default-job.json."
  type        = string
  default     = null
}

variable "job_package_dir" {
  description = "Directory holding the job package (the instance side, `batchworker-job`) and its job-package.json, built by scripts/build_lambdas.py. Null means <module>/../build/job."
  type        = string
  default     = null
}

variable "ebs_kms_key_id" {
  description = "ARN of the customer-managed KMS key that encrypts the GPU instances' EBS volumes (the account's default EBS key when it is one, or the launch template's). The trigger and worker roles, which start instances, then get kms:CreateGrant (for AWS resources only) and kms:Decrypt (through EC2) on it. Null: volumes use the AWS-managed aws/ebs key or none, which needs no grant."
  type        = string
  default     = null

  validation {
    condition     = var.ebs_kms_key_id == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[0-9a-f-]+$", var.ebs_kms_key_id))
    error_message = "The ebs_kms_key_id must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>); an alias or key id does not work in IAM policies."
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
    condition     = var.max_receive_count >= 1 && var.max_receive_count <= 1000
    error_message = "The max_receive_count must be between 1 and 1000."
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

variable "trigger_batching_window_seconds" {
  description = "How long the jobs queue's event source mapping gathers uploads before invoking the trigger (0-300 s). 0 (default) dispatches at once: a burst still shares one instance start, since placement sees the instance already starting. Raise it to dispatch a burst in fewer, larger commands at the cost of that much latency. Must be at least 1 when event_source_batch_size is over 10."
  type        = number
  default     = 0

  validation {
    condition     = var.trigger_batching_window_seconds >= 0 && var.trigger_batching_window_seconds <= 300 && floor(var.trigger_batching_window_seconds) == var.trigger_batching_window_seconds
    error_message = "The trigger_batching_window_seconds must be a whole number from 0 to 300."
  }
}

variable "event_source_mappings_enabled" {
  description = "Enable the SQS event source mappings. The local cloud sets false: its own runtime polls the queues (moto's mappings do not run the code)."
  type        = bool
  default     = true
}

variable "region_in_global_names" {
  description = "Put the region in the names that are global (S3 buckets) or account-wide (IAM roles, instance profile), so the same name_prefix can be deployed in a second region. A deployment made before this variable existed sets false to keep its names (true would replace its buckets)."
  type        = bool
  default     = true
}

variable "job_retention_days" {
  description = "Days a finished job's row (jobs table) and an instance start/stop event are kept; DynamoDB's TTL then deletes them (within a few days of expiry). Manifests and outputs in S3 are not affected."
  type        = number
  default     = 90

  validation {
    condition     = var.job_retention_days >= 1 && var.job_retention_days <= 3650
    error_message = "The job_retention_days must be from 1 to 3650."
  }
}

variable "log_retention_days" {
  description = "Retention of the Lambda functions' CloudWatch log groups, in days (one of the values CloudWatch Logs accepts)."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "The log_retention_days must be one of 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653."
  }
}

variable "lambda_subnet_ids" {
  description = "Subnets to run the worker function in (VPC access). Needed with transport = \"ssh\" when the instances have no public IP: the worker connects to their private IP. The subnets must reach the AWS APIs (NAT gateway or VPC endpoints). Empty keeps the worker outside any VPC."
  type        = list(string)
  default     = []
}

variable "lambda_security_group_ids" {
  description = "Security groups of the worker function; required (at least one) when lambda_subnet_ids is set. With transport = \"ssh\" the GPU instances admit port 22 from these groups."
  type        = list(string)
  default     = []
}

################################################################################
# Jobs: timing and transport
################################################################################

variable "transport" {
  description = "How the worker function starts a job on an instance: \"ssm\" (SSM Run Command, no inbound port) or \"ssh\" (port 22 from ssh_allowed_cidrs / lambda_security_group_ids, key in SSM). The local cloud uses \"ssh\"."
  type        = string
  default     = "ssm"

  validation {
    condition     = contains(["ssm", "ssh"], var.transport)
    error_message = "The transport must be \"ssm\" or \"ssh\"."
  }
}

variable "instance_ready_timeout_seconds" {
  description = "How long the worker function waits for an instance to be running and reachable (SSM agent Online, or SSH answering). Must stay below the worker function's 900 s timeout."
  type        = number
  default     = 600

  validation {
    condition     = var.instance_ready_timeout_seconds > 0 && var.instance_ready_timeout_seconds < 900
    error_message = "The instance_ready_timeout_seconds must be greater than 0 and less than 900 (the worker function's timeout)."
  }
}

variable "idle_grace_seconds" {
  description = "The longest an instance may sit idle (no queued, dispatched or running job) before it is stopped; see idle_grace_policy."
  type        = number
  default     = 120

  validation {
    condition     = var.idle_grace_seconds >= 0
    error_message = "The idle_grace_seconds must be 0 or more."
  }
}

variable "idle_grace_policy" {
  description = "\"adaptive\" (default): an idle instance waits as long as the recent gaps between the pool going idle and the next upload made worthwhile against a reboot, at most idle_grace_seconds (0 for isolated jobs, enough for the next file of a burst). \"fixed\": always idle_grace_seconds."
  type        = string
  default     = "adaptive"

  validation {
    condition     = contains(["adaptive", "fixed"], var.idle_grace_policy)
    error_message = "The idle_grace_policy must be \"adaptive\" or \"fixed\"."
  }
}

variable "job_lease_seconds" {
  description = "A running job renews its lease in the job table every third of this; the reaper fails a job whose lease expired (instance lost or stopped, job process dead)."
  type        = number
  default     = 90

  validation {
    condition     = var.job_lease_seconds >= 3
    error_message = "The job_lease_seconds must be at least 3."
  }
}

variable "max_attempts" {
  description = "Dispatch attempts before a job that never started is failed (the reaper re-dispatches stuck jobs)."
  type        = number
  default     = 3

  validation {
    condition     = var.max_attempts >= 1 && floor(var.max_attempts) == var.max_attempts
    error_message = "The max_attempts must be a whole number of at least 1."
  }
}

variable "max_jobs_per_instance" {
  description = "Jobs one instance runs at once; more wait for a slot there or start another instance of the pool."
  type        = number
  default     = 4

  validation {
    condition     = var.max_jobs_per_instance >= 1 && var.max_jobs_per_instance <= 64 && floor(var.max_jobs_per_instance) == var.max_jobs_per_instance
    error_message = "The max_jobs_per_instance must be a whole number from 1 to 64."
  }
}

variable "reaper_schedule_expression" {
  description = "EventBridge schedule of the reaper function (fails lost or overlong jobs, re-dispatches stuck ones, stops idle instances): the backstop that keeps no GPU running for nothing."
  type        = string
  default     = "rate(1 minute)"

  validation {
    condition     = can(regex("^(rate\\([1-9][0-9]* (minute|minutes|hour|hours|day|days)\\)|cron\\(.+\\))$", var.reaper_schedule_expression))
    error_message = "The reaper_schedule_expression must be an EventBridge rate(N minutes) or cron(...) expression."
  }
}

variable "max_job_runtime_seconds" {
  description = "Longest a job may run; also the SSM Run Command execution timeout (SSM allows at most 172800 s, 48 h)."
  type        = number
  default     = 3600

  validation {
    condition     = var.max_job_runtime_seconds > 0 && var.max_job_runtime_seconds <= 172800 && floor(var.max_job_runtime_seconds) == var.max_job_runtime_seconds
    error_message = "The max_job_runtime_seconds must be a whole number of seconds, greater than 0 and at most 172800 (48 h, the SSM Run Command limit)."
  }
}

variable "ssh_user" {
  description = "User the job runs as on the instance (both transports) and the SSH login user (ubuntu on the Deep Learning AMI)."
  type        = string
  default     = "ubuntu"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_-]{0,31}$", var.ssh_user)) && var.ssh_user != "root"
    error_message = "The ssh_user must be a POSIX user name other than root."
  }
}

variable "job_command" {
  description = "Fixed command that starts a job on the instance; it reads the job spec (JSON) from stdin. The SSM document runs it, and with SSH it is the forced command of the worker function's key."
  type        = string
  default     = "/opt/batchworker/bin/batchworker-launch"

  validation {
    # It lands in a shell command line (SSM document, authorized_keys command="..."): no quoting games.
    condition     = can(regex("^[A-Za-z0-9_./ =+@:,%-]+$", var.job_command))
    error_message = "The job_command may contain only letters, digits, spaces and _ . / = + @ : , % - (no quotes or shell metacharacters)."
  }
}

variable "ssh_public_key" {
  description = "OpenSSH public key of the worker function's login key (private half in the SSM SecureString /<name_prefix>/ssh/private-key). With transport = \"ssh\", user data authorizes it for ssh_user, restricted to job_command. Null authorizes nothing."
  type        = string
  default     = null

  validation {
    condition     = var.ssh_public_key == null || can(regex("^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa) [A-Za-z0-9+/]+={0,3}( [^\\n]*)?$", var.ssh_public_key))
    error_message = "The ssh_public_key must be one OpenSSH public key line (ssh-ed25519 AAAA... [comment])."
  }
}

################################################################################
# GPU instances
################################################################################

variable "ami_id" {
  description = "AMI of the GPU instances. Null picks the newest AWS Deep Learning OSS Nvidia Driver AMI GPU PyTorch (Ubuntu 24.04, x86_64) owned by Amazon. Either way an existing instance keeps its image until you roll it (terraform/README.md, \"Rolling the instances\")."
  type        = string
  default     = null

  validation {
    condition     = var.ami_id == null || can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "The ami_id must look like ami-0123456789abcdef0."
  }
}

variable "instance_type" {
  description = "EC2 instance type of the GPU instances (an NVIDIA GPU family: g4dn, g5, g6, g6e, gr6, p3, p3dn, p4d, p4de, p5, p5e)."
  type        = string
  default     = "g4dn.xlarge"

  validation {
    condition     = can(regex("^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e)\\.[0-9a-z]+$", var.instance_type))
    error_message = "The instance_type must be an x86_64 NVIDIA GPU type such as g4dn.xlarge, g5.xlarge, g6.xlarge or p4d.24xlarge."
  }
}

variable "instance_count" {
  description = "Number of GPU instances in the pool (created, then left stopped). At most 500 with the ssm transport (no per-instance IAM); at most 20 with ssh, where each instance adds a statement to the instance role's policy (inline policies are limited to 10,240 characters)."
  type        = number
  default     = 1

  validation {
    condition     = var.instance_count >= 1 && var.instance_count <= 500 && floor(var.instance_count) == var.instance_count
    error_message = "The instance_count must be a whole number from 1 to 500 (at most 20 with transport = \"ssh\")."
  }
}

variable "key_name" {
  description = "Optional EC2 key pair for operator SSH access. The worker function uses the key in SSM, not this one."
  type        = string
  default     = null
}

variable "ssh_allowed_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach the GPU instances on port 22 (only with transport = \"ssh\"). Empty means no CIDR ingress at all; 0.0.0.0/0 and other /0 blocks are refused."
  type        = list(string)
  default     = []

  validation {
    condition = alltrue([
      for cidr in var.ssh_allowed_cidrs : can(cidrnetmask(cidr)) && !can(regex("/0$", cidr))
    ])
    error_message = "Every ssh_allowed_cidrs entry must be an IPv4 CIDR block such as 10.0.0.0/16, and none may be a /0 (0.0.0.0/0 opens SSH to the internet)."
  }
}

variable "subnet_id" {
  description = "Deprecated: use subnet_ids. One subnet for the whole pool; kept so existing deployments plan no change (it is the same as subnet_ids = [subnet_id]). Set one of the two, not both."
  type        = string
  default     = null

  validation {
    condition     = var.subnet_id == null || can(regex("^subnet-[0-9a-f]+$", var.subnet_id))
    error_message = "The subnet_id must be null or a subnet id such as subnet-0123456789abcdef0."
  }
}

variable "subnet_ids" {
  description = "Subnets of the GPU instances, ideally one per Availability Zone: instance N goes to subnet_ids[N % length]. When an AZ has no GPU capacity, jobs move to an instance in another one. Empty uses subnet_id, else the default VPC's default subnet. Each subnet must reach S3, DynamoDB and SSM (internet gateway, NAT or VPC endpoints)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", id))]) && length(distinct(var.subnet_ids)) == length(var.subnet_ids)
    error_message = "Every subnet_ids entry must be a subnet id such as subnet-0123456789abcdef0, each listed once."
  }
}

variable "max_capacity_wait_seconds" {
  description = "How long a job may wait for GPU capacity (InsufficientInstanceCapacity in every AZ of the pool) before it is failed with a manifest that says so. Meanwhile it stays QUEUED, `status` shows \"waiting for capacity\", and the reaper keeps trying the pool's instances."
  type        = number
  default     = 3600

  validation {
    condition     = var.max_capacity_wait_seconds >= 60 && var.max_capacity_wait_seconds <= 604800
    error_message = "The max_capacity_wait_seconds must be from 60 to 604800 (7 days)."
  }
}

variable "root_volume_size_gb" {
  description = "Size of the instances' encrypted root volume in GiB. Null keeps the AMI's own size."
  type        = number
  default     = null

  validation {
    condition     = var.root_volume_size_gb == null || try(var.root_volume_size_gb >= 8, false)
    error_message = "The root_volume_size_gb must be at least 8 (or null for the AMI's size)."
  }
}

variable "user_data" {
  description = "Replacement cloud-init user data of the GPU instances. Null renders templates/user_data.sh.tftpl (installs the job package, prepares the job root, publishes the SSH endpoint when transport = \"ssh\")."
  type        = string
  default     = null
}

variable "reserved_concurrency" {
  description = "Reserved concurrent executions per function (keys trigger, worker, stop, reaper; -1 or absent: unreserved). At high upload rates reserve some for trigger and stop (say 10 each) so dispatchers waiting on booting instances cannot starve them, and cap worker. Accounts with the default 10-execution quota cannot reserve any."
  type        = map(number)
  default     = {}

  validation {
    condition     = alltrue([for name, value in var.reserved_concurrency : contains(["trigger", "worker", "stop", "reaper"], name) && value >= -1 && floor(value) == value])
    error_message = "The reserved_concurrency keys must be trigger, worker, stop or reaper, each a whole number >= -1."
  }
}
