"""Prefect flows: the wiring of the steps in `tasks/`."""
