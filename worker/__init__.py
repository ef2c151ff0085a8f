"""The job that runs on the GPU instance: input -> the job package's handler -> results + manifest."""
