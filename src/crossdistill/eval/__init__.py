"""Evaluation: metrics, scorers, reports."""
