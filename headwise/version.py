"""The package version (kept in its own module so every floor can read it without importing the package's
public face)."""

__version__ = "0.1.0"
