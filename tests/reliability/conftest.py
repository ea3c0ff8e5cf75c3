"""Reliability tests: faults injected by a real HTTP proxy (tests/faults) in front of the real server."""

from tests.faults.fixtures import fault_proxy, faulty_transport, make_faulty_transport

__all__ = ["fault_proxy", "faulty_transport", "make_faulty_transport"]
