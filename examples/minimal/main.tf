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
  subnet_ids  = var.subnet_ids
}

# Private subnets (no NAT gateway): the instances reach S3 and DynamoDB through gateway endpoints (free).
# Without the DynamoDB one the jobs cannot renew their leases; SSM needs interface endpoints (ssm,
# ssmmessages, ec2messages) or a NAT gateway as well: see ../../terraform/README.md.
data "aws_subnet" "first" {
  count = length(var.private_route_table_ids) > 0 ? 1 : 0

  id = var.subnet_ids[0]
}

resource "aws_vpc_endpoint" "gateway" {
  for_each = length(var.private_route_table_ids) > 0 ? toset(["s3", "dynamodb"]) : toset([])

  vpc_id            = data.aws_subnet.first[0].vpc_id
  service_name      = "com.amazonaws.${var.region}.${each.key}"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = var.private_route_table_ids
}
