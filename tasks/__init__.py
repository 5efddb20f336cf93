"""The steps of a job: plain functions, each also wrapped as a Prefect task."""
