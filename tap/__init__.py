"""
Assembly of the hypervisor daemon: its flags (L{Options}) and its service tree
(L{makeService}). Named by the twistd plugin; holds no logic of its own.
"""

from tap.options import Options
from tap.service import makeService

__all__ = ["Options", "makeService"]
