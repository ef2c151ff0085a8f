"""The IAM check: recorded AWS calls against the policies Terraform rendered (`make iam-check`)."""
