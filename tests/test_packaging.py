"""
The installed distribution (what C{tools/setup.sh} puts in C{.venv}, and what
C{hypervisor run} imports outside the checkout) holds every module and data file of
the source tree: a protocol package or template missing from C{setup.py} would make
the installed daemon fail where the tests, run from the checkout, pass.
"""

from __future__ import annotations

import os
import subprocess
from importlib import metadata

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALLED = ("hypervisor/", "tap/", "web/", "twisted/plugins/hypervisor_plugin.py")


def tracked_files() -> set[str]:
    """
    The files git tracks under the installed trees (the source of truth of a clone).
    """
    out = subprocess.run(
        ["git", "ls-files", "hypervisor", "tap", "web", "twisted/plugins"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line for line in out.splitlines() if line.startswith(INSTALLED)}


class PackagingTests(SynchronousTestCase):
    def test_every_source_file_installed(self) -> None:
        """
        Every tracked module, template and static file is in the installed distribution.
        """
        try:
            dist = metadata.distribution("smallstack-hypervisor")
        except metadata.PackageNotFoundError:
            self.fail("smallstack-hypervisor is not installed: run tools/setup.sh --test")
        installed = {str(path) for path in dist.files or []}
        if any(path.endswith("direct_url.json") for path in installed):
            url = dist.read_text("direct_url.json") or ""
            if '"editable": true' in url.replace(" ", "").replace('":true', '": true'):
                return  # an editable install imports the checkout itself
        wanted = {path for path in tracked_files() if not path.endswith(".pyi")}
        missing = sorted(wanted - installed)
        self.assertEqual(missing, [], "not installed by setup.py: " + ", ".join(missing))
