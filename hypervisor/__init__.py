"""
smallstack-hypervisor: everything the daemon knows (no web code).
"""

__version__ = "0.1.0"
