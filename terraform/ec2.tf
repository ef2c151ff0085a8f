################################################################################
# GPU instance pool: the boxes that run the job (not the "worker" Lambda, which only
# dispatches). Created once, left stopped; the trigger starts them, stop stops them.
# They are found by the batchworker:pool tag, never by an ID stored somewhere.
################################################################################

data "aws_ami" "gpu" {
  most_recent = true
  owners      = var.ami_id == null ? ["amazon"] : null

  # The supported DLAMI line, e.g. "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.9 (Ubuntu 24.04) 20260317".
  filter {
    name   = var.ami_id == null ? "name" : "image-id"
    values = [coalesce(var.ami_id, "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 24.04) *")]
  }

  # Only for the lookup: an explicit ami_id is taken as given.
  dynamic "filter" {
    for_each = var.ami_id == null ? ["x86_64"] : []

    content {
      name   = "architecture"
      values = [filter.value]
    }
  }
}

locals {
  ami_root_volume_size_gb = one([
    for mapping in data.aws_ami.gpu.block_device_mappings : tonumber(mapping.ebs.volume_size)
    if mapping.device_name == data.aws_ami.gpu.root_device_name
  ])
  root_volume_size_gb = coalesce(var.root_volume_size_gb, local.ami_root_volume_size_gb)

  # Type and key only: the comment never reaches the instance (or a shell).
  ssh_public_key = var.ssh_public_key == null ? "" : join(" ", slice(split(" ", trimspace(var.ssh_public_key)), 0, 2))

  user_data = var.user_data != null ? var.user_data : templatefile("${path.module}/templates/user_data.sh.tftpl", {
    parameter_prefix    = local.parameter_prefix
    region              = var.region
    transport           = var.transport
    job_user            = var.ssh_user
    job_command         = var.job_command
    job_root            = local.instance_job_root
    job_package_pointer = local.job_package_pointer
    ssh_public_key      = var.transport == "ssh" ? local.ssh_public_key : ""
    packages_uri        = "s3://${aws_s3_bucket.this["artifacts"].id}/job-packages/"
    default_job         = var.default_job
    # prewarm reads the packages of the jobs that started the instance from its ledger item there
    instance_events_table = aws_dynamodb_table.instance_events.name
  })

  # Tags of what the instances create (volumes, network interfaces): default_tags does not reach them.
  instance_tags = merge(var.tags, {
    "batchworker:pool" = var.name_prefix
  })
}

locals {
  # subnet_ids, else the deprecated single subnet_id (same plan as before for existing deployments).
  pool_subnet_ids = length(var.subnet_ids) > 0 ? var.subnet_ids : compact([var.subnet_id])
}

data "aws_subnet" "selected" {
  count = length(local.pool_subnet_ids) > 0 ? 1 : 0

  id = local.pool_subnet_ids[0]
}

data "aws_vpc" "default" {
  count = length(local.pool_subnet_ids) > 0 ? 0 : 1

  default = true
}

resource "aws_security_group" "gpu" {
  name        = "${var.name_prefix}-gpu"
  description = "batchworker GPU instances: SSH only with transport ssh, from the allowed CIDRs and worker SGs"
  vpc_id      = length(local.pool_subnet_ids) > 0 ? data.aws_subnet.selected[0].vpc_id : data.aws_vpc.default[0].id

  # SSH transport: port 22 from the configured CIDRs (never 0.0.0.0/0: the variable refuses it).
  dynamic "ingress" {
    for_each = var.transport == "ssh" && length(var.ssh_allowed_cidrs) > 0 ? [var.ssh_allowed_cidrs] : []

    content {
      description = "SSH from ssh_allowed_cidrs (worker function subnets, operators)"
      from_port   = 22
      to_port     = 22
      protocol    = "tcp"
      cidr_blocks = ingress.value
    }
  }

  # SSH transport: port 22 from the worker function's security groups (worker in a VPC).
  dynamic "ingress" {
    for_each = var.transport == "ssh" && length(var.lambda_security_group_ids) > 0 ? [var.lambda_security_group_ids] : []

    content {
      description     = "SSH from the worker function"
      from_port       = 22
      to_port         = 22
      protocol        = "tcp"
      security_groups = ingress.value
    }
  }

  # HTTPS only: S3, SSM (ssm, ssmmessages, ec2messages), package downloads. DNS, NTP and instance
  # metadata use link-local addresses that security groups do not filter.
  egress {
    description      = "HTTPS to AWS APIs and package indexes"
    from_port        = 443
    to_port          = 443
    protocol         = "tcp"
    cidr_blocks      = ["0.0.0.0/0"]
    ipv6_cidr_blocks = ["::/0"]
  }
}

resource "aws_launch_template" "gpu" {
  name                                 = "${var.name_prefix}-gpu"
  image_id                             = data.aws_ami.gpu.id
  instance_type                        = var.instance_type
  key_name                             = var.key_name
  vpc_security_group_ids               = [aws_security_group.gpu.id]
  instance_initiated_shutdown_behavior = "stop"
  ebs_optimized                        = true
  user_data                            = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.gpu.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  # Root volume: the AMI's own size unless root_volume_size_gb is set (stated explicitly: moto requires
  # a size), encrypted with the account's default EBS key.
  block_device_mappings {
    device_name = data.aws_ami.gpu.root_device_name

    ebs {
      volume_size           = local.root_volume_size_gb
      encrypted             = true
      volume_type           = "gp3"
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "volume"
    tags          = local.instance_tags
  }

  tag_specifications {
    resource_type = "network-interface"
    tags          = local.instance_tags
  }
}

resource "aws_instance" "gpu" {
  #checkov:skip=CKV_AWS_8:The root volume is encrypted through the launch template's block_device_mappings.
  #checkov:skip=CKV_AWS_126:Detailed (1-minute) monitoring bills per instance; 5-minute metrics suffice for a batch box.
  count = var.instance_count

  # Spread over the AZs of subnet_ids: a GPU shortage in one AZ leaves the others.
  subnet_id     = length(local.pool_subnet_ids) > 0 ? local.pool_subnet_ids[count.index % length(local.pool_subnet_ids)] : null
  ebs_optimized = true

  launch_template {
    id      = aws_launch_template.gpu.id
    version = aws_launch_template.gpu.latest_version
  }

  # Also in the launch template; repeated here because moto ignores the template's
  # profile and metadata options (it would report IMDSv1 and no profile locally).
  iam_instance_profile = aws_iam_instance_profile.gpu.name

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name               = "${var.name_prefix}-gpu-${count.index}"
    "batchworker:pool" = var.name_prefix
  }

  # User data comes from the launch template. The provider re-hashes the stored hash of
  # inherited user data and plans a perpetual (stop-the-instance) update:
  # hashicorp/terraform-provider-aws#30825.
  # launch_template: an instance keeps the template version it was created from. A new DLAMI (AWS
  # publishes them often: ami_id null follows the newest), a new instance type or new user data makes a
  # new template version, never a replaced instance under a running job; the operator rolls the
  # instances on purpose (terraform/README.md, "Rolling the instances").
  lifecycle {
    ignore_changes = [user_data, launch_template]
  }
}

# Leave new instances stopped; ignore_changes so a later apply never stops one at work.
resource "aws_ec2_instance_state" "gpu" {
  count = var.instance_count

  instance_id = aws_instance.gpu[count.index].id
  state       = "stopped"

  lifecycle {
    ignore_changes = [state]
  }
}
