# One provider for AWS and for the local cloud: when aws_endpoint_url is set (a moto
# server), every service this configuration uses is pointed at it and the checks that
# need real AWS (credentials, instance metadata, account lookup) are skipped.
provider "aws" {
  region = var.region

  skip_credentials_validation = local.is_local
  skip_metadata_api_check     = local.is_local
  skip_requesting_account_id  = local.is_local
  s3_use_path_style           = local.is_local

  dynamic "endpoints" {
    for_each = local.is_local ? [var.aws_endpoint_url] : []

    content {
      dynamodb = endpoints.value
      ec2      = endpoints.value
      events   = endpoints.value
      iam      = endpoints.value
      lambda   = endpoints.value
      logs     = endpoints.value
      s3       = endpoints.value
      sqs      = endpoints.value
      ssm      = endpoints.value
      sts      = endpoints.value
    }
  }

  default_tags {
    tags = var.tags
  }
}
