"""The emoji world: small real models that ship with the project."""
