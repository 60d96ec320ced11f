"""
Command-line programs: ``hypervisor``, ``vm-control`` and ``hyper-control``.
"""
