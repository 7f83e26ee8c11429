"""Model-agnostic Bridge: Student latents into the Teacher space (DESIGN.md §2)."""
