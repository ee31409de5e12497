"""Training scripts for the project's own models (see training/README.md)."""
