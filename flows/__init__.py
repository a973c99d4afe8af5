"""Prefect flows: orchestration only, no image or tensor code. Each stage is also runnable alone."""
