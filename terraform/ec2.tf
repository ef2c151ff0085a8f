################################################################################
# GPU instance pool: the boxes that run the job (not the "worker" Lambda, which only
# dispatches). Created once, left stopped; the trigger starts them, stop stops them.
# They are found by the batchworker:pool tag, never by an ID stored somewhere.
################################################################################

data "aws_ami" "gpu" {
  most_recent = true
  owners      = var.ami_id == null ? ["amazon"] : null

  filter {
    name   = var.ami_id == null ? "name" : "image-id"
    values = [coalesce(var.ami_id, "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *")]
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
  root_volume_size_gb = one([
    for mapping in data.aws_ami.gpu.block_device_mappings : tonumber(mapping.ebs.volume_size)
    if mapping.device_name == data.aws_ami.gpu.root_device_name
  ])
}

data "aws_subnet" "selected" {
  count = var.subnet_id == null ? 0 : 1

  id = var.subnet_id
}

data "aws_vpc" "default" {
  count = var.subnet_id == null ? 1 : 0

  default = true
}

resource "aws_security_group" "gpu" {
  name        = "${var.name_prefix}-gpu"
  description = "batchworker GPU instances: SSH only from ssh_allowed_cidrs"
  vpc_id      = var.subnet_id == null ? data.aws_vpc.default[0].id : data.aws_subnet.selected[0].vpc_id

  dynamic "ingress" {
    for_each = length(var.ssh_allowed_cidrs) > 0 ? [var.ssh_allowed_cidrs] : []

    content {
      description = "SSH (worker function, operators)"
      from_port   = 22
      to_port     = 22
      protocol    = "tcp"
      cidr_blocks = ingress.value
    }
  }

  egress {
    description      = "S3, SSM and package downloads"
    from_port        = 0
    to_port          = 0
    protocol         = "-1"
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
  user_data                            = var.user_data == null ? null : base64encode(var.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.gpu.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  # Root volume: the AMI's own size (stated explicitly: moto requires a size), encrypted.
  block_device_mappings {
    device_name = data.aws_ami.gpu.root_device_name

    ebs {
      volume_size           = local.root_volume_size_gb
      encrypted             = true
      volume_type           = "gp3"
      delete_on_termination = true
    }
  }
}

resource "aws_instance" "gpu" {
  count = var.instance_count

  subnet_id = var.subnet_id

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
  lifecycle {
    ignore_changes = [user_data]
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
