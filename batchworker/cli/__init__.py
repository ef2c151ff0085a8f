"""The `batchworker` command line."""
