"""aload's version, as installed (one source: pyproject.toml)."""

from importlib import metadata

try:
    VERSION = metadata.version("aload")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0.0.0+unknown"
