"""Dagster Definitions: jobs, resource wiring, run-config profiles (DESIGN.md §2)."""
