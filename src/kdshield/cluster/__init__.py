"""Connecting to Ray: a local instance by default, or a running cluster."""

from kdshield.cluster.connect import connect, default_env

__all__ = ["connect", "default_env"]
