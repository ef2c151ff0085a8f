output "input_bucket" {
  description = "Upload a file here to start a job."
  value       = module.batchworker.input_bucket
}

output "output_bucket" {
  description = "Results land here under jobs/<job_id>/ (manifest.json last)."
  value       = module.batchworker.output_bucket
}

output "jobs_table" {
  description = "DynamoDB table of jobs (batchworker status reads it)."
  value       = module.batchworker.jobs_table
}

output "instance_events_table" {
  description = "DynamoDB table of GPU instance events."
  value       = module.batchworker.instance_events_table
}

output "pool_tag" {
  description = "Value of the batchworker:pool tag on the GPU instances."
  value       = module.batchworker.pool_tag
}

output "instance_ids" {
  description = "GPU instances of the pool (stopped while idle)."
  value       = module.batchworker.instance_ids
}

output "region" {
  description = "AWS region of the deployment."
  value       = module.batchworker.region
}
