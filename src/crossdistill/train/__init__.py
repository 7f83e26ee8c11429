"""Training jobs and their machinery (checkpoints, seeding, stats)."""
