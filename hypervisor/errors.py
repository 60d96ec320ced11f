# -*- test-case-name: tests.test_manager_vms -*-
"""
Errors of the service layer. Each is a sentence for the operator; its class tells a
transport which status to use (HTTP 400/403/404/409/507/503/500).
"""

from __future__ import annotations


class HypervisorError(Exception):
    """
    Base of every error the service layer reports to a caller.
    """

    status = 500


class InvalidRequest(HypervisorError):
    """
    The request is malformed or asks for something impossible (HTTP 400).
    """

    status = 400


class AccessDenied(HypervisorError):
    """
    The caller may not do this (HTTP 403).
    """

    status = 403


class NotFound(HypervisorError):
    """
    No such VM, subnet or address (HTTP 404).
    """

    status = 404


class WrongState(HypervisorError):
    """
    The VM is not in a state that allows the operation (HTTP 409).
    """

    status = 409


class InsufficientCapacity(HypervisorError):
    """
    Not enough CPU, memory, storage or addresses (HTTP 507).
    """

    status = 507


class Unavailable(HypervisorError):
    """
    The hypervisor is disabled, or libvirt is not connected (HTTP 503).
    """

    status = 503
