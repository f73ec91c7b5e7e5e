"""Data steps: built-in sources, the on-disk dataset layout, DVC versioning and splits."""
