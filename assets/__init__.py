"""Dagster assets and asset checks: thin adapters over ``model_code``, one module per stage."""
