"""The local cloud: moto server, Terraform, a local Lambda runtime and local instance hosts."""
