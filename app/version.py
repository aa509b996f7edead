"""The installed version of the service package."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "embedding-service"

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"
