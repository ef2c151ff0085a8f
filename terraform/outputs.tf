output "region" {
  description = "AWS region of the deployment."
  value       = var.region
}

output "input_bucket" {
  description = "Bucket whose uploads start jobs."
  value       = aws_s3_bucket.this["input"].id
}

output "output_bucket" {
  description = "Bucket receiving jobs/<job_id>/ results and manifest.json."
  value       = aws_s3_bucket.this["output"].id
}

output "artifacts_bucket" {
  description = "Bucket holding the job packages and the job wheel."
  value       = aws_s3_bucket.this["artifacts"].id
}

output "default_job" {
  description = "Name of the job package that runs uploads outside every deployed job's prefix (empty: none)."
  value       = var.default_job
}

output "jobs_table" {
  description = "DynamoDB table of jobs."
  value       = aws_dynamodb_table.jobs.name
}

output "instance_events_table" {
  description = "DynamoDB table of GPU instance events."
  value       = aws_dynamodb_table.instance_events.name
}

output "jobs_queue_url" {
  description = "URL of the SQS queue of input upload events (consumed by the trigger function)."
  value       = aws_sqs_queue.jobs.id
}

output "done_queue_url" {
  description = "URL of the SQS queue of manifest.json events (consumed by the stop function)."
  value       = aws_sqs_queue.done.id
}

output "trigger_function_name" {
  description = "Name of the trigger Lambda function."
  value       = aws_lambda_function.this["trigger"].function_name
}

output "worker_function_name" {
  description = "Name of the worker (dispatcher) Lambda function."
  value       = aws_lambda_function.this["worker"].function_name
}

output "stop_function_name" {
  description = "Name of the stop Lambda function."
  value       = aws_lambda_function.this["stop"].function_name
}

output "reaper_function_name" {
  description = "Name of the reaper Lambda function (EventBridge schedule reaper_schedule_expression)."
  value       = aws_lambda_function.this["reaper"].function_name
}

output "instance_ids" {
  description = "IDs of the GPU instances in the pool."
  value       = aws_instance.gpu[*].id
}

output "pool_tag" {
  description = "Value of the batchworker:pool tag on the GPU instances."
  value       = var.name_prefix
}

output "parameter_prefix" {
  description = "SSM parameter prefix of this deployment."
  value       = local.parameter_prefix
}

output "ssh_private_key_parameter" {
  description = "SSM SecureString parameter the worker function reads its SSH login key from (created outside Terraform)."
  value       = "${local.parameter_prefix}/ssh/private-key"
}

output "instance_type" {
  description = "EC2 instance type of the GPU instances."
  value       = var.instance_type
}

output "transport" {
  description = "How the worker function starts jobs on the instances: ssm (Run Command) or ssh."
  value       = var.transport
}

output "ssm_document_name" {
  description = "SSM Command document the worker function runs on an instance to start a job (JobSpec = base64 job spec JSON)."
  value       = aws_ssm_document.run_job.name
}

output "ssm_output_bucket" {
  description = "Bucket receiving SSM Run Command output (stdout/stderr of the run-job document)."
  value       = aws_s3_bucket.this["output"].id
}

output "ssm_output_prefix" {
  description = "Key prefix of SSM Run Command output in ssm_output_bucket."
  value       = local.ssm_output_prefix
}

output "job_package_uri" {
  description = "s3:// URI of the job package (batchworker-job) the instances install at boot."
  value       = "s3://${aws_s3_object.job_package.bucket}/${aws_s3_object.job_package.key}"
}

output "worker_dead_letter_queue_url" {
  description = "URL of the SQS queue holding worker invocations that failed every retry."
  value       = aws_sqs_queue.worker_dlq.id
}

output "gpu_security_group_id" {
  description = "Security group of the GPU instances (no inbound rule unless transport = ssh)."
  value       = aws_security_group.gpu.id
}

output "client_policy_json" {
  description = "IAM policy for a client of this deployment: upload inputs, read results, logs and manifests, read job status (batchworker submit/status/results/logs). Attach it to the client's user or role."
  value       = data.aws_iam_policy_document.client.json
}

output "operator_policy_json" {
  description = "IAM policy for the CLI's operator commands (batchworker report, dashboard, job deploy/list/rollback). Attach it together with client_policy_json."
  value       = data.aws_iam_policy_document.operator.json
}
