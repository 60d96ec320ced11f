"""
Packaging for smallstack-hypervisor: a SmallStack-compatible VM hypervisor agent on
Twisted and libvirt.
"""

from setuptools import find_packages, setup

setup(
    name="smallstack-hypervisor",
    version="0.1.0",
    description="SmallStack-compatible VM hypervisor agent (Twisted + libvirt)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # Every package under hypervisor/, tap/ and web/ (a new protocol package is
    # installed without touching this file; tests/test_packaging.py checks it).
    packages=find_packages(include=["hypervisor", "hypervisor.*", "tap", "web"])
    # Twisted finds plugins in every twisted/plugins directory; this one has
    # no __init__.py on purpose (Twisted's plugin how-to).
    + ["twisted.plugins"],
    package_data={
        "twisted.plugins": ["hypervisor_plugin.py"],
        "web": ["templates/*.html", "static/*"],
    },
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=23.10",
        "klein>=23.5",
        "pyopenssl>=23.2",
        "service-identity>=23.1",
        "libvirt-python>=9.0,<13",
        "txtorcon>=23.5",
        "jinja2>=3.1",
        "treq>=23.11",
        "prometheus-client>=0.17",
        # The console WebSocket on port 6976 (web/console.py).
        "autobahn[twisted]>=24.4",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.80",
            "cryptography>=41",
            "mypy>=1.8",
            "mypy-zope>=1.0",
            "black>=24.1",
            "isort>=5.13",
            # The browser console test drives /usr/bin/chromium (no browser download).
            "playwright>=1.40",
        ],
    },
    entry_points={
        "console_scripts": [
            "hypervisor = hypervisor.cli.hypervisor:main",
            "vm-control = hypervisor.cli.vm_control:main",
            "hyper-control = hypervisor.cli.hyper_control:main",
        ],
    },
)
