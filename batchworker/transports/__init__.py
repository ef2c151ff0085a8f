"""Ways of starting a job on an instance."""
