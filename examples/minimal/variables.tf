variable "region" {
  description = "AWS region to deploy into (needs a GPU quota for g4dn.xlarge: the \"Running On-Demand G and VT instances\" vCPU quota, 4 or more)."
  type        = string
  default     = "us-east-1"
}

variable "name_prefix" {
  description = "Prefix of every resource name (part of the bucket names, which must be unique per account)."
  type        = string
  default     = "batchworker"
}

variable "tags" {
  description = "Tags for every resource (cost allocation)."
  type        = map(string)
  default = {
    project = "batchworker"
  }
}
