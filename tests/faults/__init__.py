"""Fault injection for tests: a real HTTP proxy in front of the real S3 server (see :mod:`.proxy`)."""

from .proxy import ACTIONS, ANY, KINDS, Fault, FaultProxy, LogEntry, classify

__all__ = ["ACTIONS", "ANY", "KINDS", "Fault", "FaultProxy", "LogEntry", "classify"]
