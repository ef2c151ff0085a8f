"""The job that runs on the GPU instance: input -> model -> predictions + manifest."""
