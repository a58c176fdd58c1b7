"""Dagster Definitions: jobs, resource wiring, run-config profiles (docs/architecture.md §2)."""
