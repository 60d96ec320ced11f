"""
The code base is formatted by black and its imports sorted by isort (settings in
pyproject.toml), as DESIGN.md asks; this test keeps it so.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests import support


class StyleTests(SynchronousTestCase):
    """
    black and isort have nothing to change.
    """

    def run_tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", *args],
            cwd=support.REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def test_black(self) -> None:
        """
        black --check finds no file to reformat.
        """
        result = self.run_tool("black", "--check", ".")
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)

    def test_isort(self) -> None:
        """
        isort --check-only finds no import block to reorder.
        """
        result = self.run_tool("isort", "--check-only", "--quiet", ".")
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
