"""Export to a standard diffusers one-step pipeline, and generation from it."""
