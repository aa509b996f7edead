"""The installed version of the service package."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "plateau-embeddings"
"""The distribution's name: this project's own (the package index's ``embedding-service`` is someone else's);
the service, its command and its metrics keep the name embedding-service."""

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"
