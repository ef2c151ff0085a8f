# A minimal real deployment of batchworker: the defaults of ../../terraform (SSM Run Command transport,
# no inbound port, one g4dn.xlarge from the newest Deep Learning AMI with PyTorch, encryption and
# TLS-only buckets), in your region, with your tags. Build first: see README.md.

terraform {
  required_version = ">= 1.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

module "batchworker" {
  source = "../../terraform"

  region      = var.region
  name_prefix = var.name_prefix
  tags        = var.tags
}
