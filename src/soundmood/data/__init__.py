"""Data stage: read the RAF-DB tree, validate it, and prepare the cached splits."""
