# -*- test-case-name: tests.test_netguard -*-
"""
The HTTP channel of port 6976 (placeholder: deadlines for headers are added by the
security-hardening work).
"""

from __future__ import annotations

from twisted.web.http import HTTPChannel


class HypervisorChannel(HTTPChannel):
    """
    An HTTP channel with deadlines.
    """
