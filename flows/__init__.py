"""graft's Prefect flows: running the DVC pipeline as observable, schedulable flow runs."""
