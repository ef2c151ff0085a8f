"""batchworker: event-driven GPU batch jobs on AWS (shared core)."""
