"""Losses: small functions returning (loss, logs)."""
