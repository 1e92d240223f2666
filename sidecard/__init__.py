"""sidecard: a production-reliability sidecar for applications built on Claude."""

__version__ = "0.1.0"
