"""
The code base type-checks with mypy (settings in mypy.ini).
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests import support


class MypyTests(SynchronousTestCase):
    """
    mypy over hypervisor/, tap/ and web/.
    """

    def test_mypy_clean(self) -> None:
        """
        mypy reports no error.
        """
        try:
            import mypy  # noqa: F401
        except ImportError:
            support.require(False, "mypy is not installed (pip install '.[test]')")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--config-file",
                "mypy.ini",
                "--cache-dir",
                "/tmp/hypervisor-mypy-cache",
            ],
            cwd=support.REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
