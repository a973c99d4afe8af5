"""Prefect tasks, one file a stage: thin wrappers (caching, retries, logging, artifacts) over plain functions."""
