"""
C{python -m hypervisor}: the C{hypervisor} command.
"""

import sys

from hypervisor.cli.hypervisor import main

sys.exit(main())
