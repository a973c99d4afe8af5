"""Evaluation stages: the grid (generation and losses), the scores, and the selection."""
