"""webhookd: delivers CRM change events from Kafka to signed webhooks, at least once."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("webhookd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
