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

variable "subnet_ids" {
  description = "Subnets of the GPU instances, one per Availability Zone if you can (empty: the default VPC's default subnet)."
  type        = list(string)
  default     = []
}

variable "private_route_table_ids" {
  description = "Route tables of private subnet_ids (no NAT gateway): S3 and DynamoDB gateway endpoints are added to them. Empty adds none."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.private_route_table_ids : can(regex("^rtb-[0-9a-f]+$", id))])
    error_message = "Every private_route_table_ids entry must be a route table id such as rtb-0123456789abcdef0."
  }
}
