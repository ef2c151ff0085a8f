"""`batchworker dashboard`: a local, read-only web page of jobs, instances, cost and queues."""
