# -*- test-case-name: tests.test_options -*-
"""
The daemon's flags, for twistd: a re-export of L{hypervisor.options}.

The flag table and its parsing live in L{hypervisor.options} so that the
C{hypervisor} command needs nothing from C{tap}; this module keeps the name that
the twistd plugin (C{tap.Options}) and L{tap.service} use.
"""

from hypervisor.options import (
    BOOLEAN_NAMES,
    BOOLEANS,
    DATASOURCES,
    DOMAIN_TYPES,
    NOT_USED_YET,
    PARAMETER_NAMES,
    PARAMETERS,
    SECTION_OURS,
    Options,
)

__all__ = [
    "BOOLEAN_NAMES",
    "BOOLEANS",
    "DATASOURCES",
    "DOMAIN_TYPES",
    "NOT_USED_YET",
    "PARAMETER_NAMES",
    "PARAMETERS",
    "SECTION_OURS",
    "Options",
]
