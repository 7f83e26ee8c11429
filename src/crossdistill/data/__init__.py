"""Datasets: the emoji world, image folders, prompt sets."""
