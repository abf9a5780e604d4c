"""controlrt's version, in one place (pyproject.toml says the same; a test keeps them equal)."""

__version__ = "0.23.0"
