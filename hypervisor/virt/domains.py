# -*- test-case-name: tests.test_virt_domains -*-
"""
Blocking helpers over a libvirt connection: which domains are ours, their states,
shutting them down, and deciding the domain type (KVM or TCG) by a real probe.

Every function here blocks on libvirtd: call them through
L{hypervisor.virt.connection.LibvirtService.call}, never on the reactor thread.

A domain is ours when it carries our element in its C{<metadata>}::

    <metadata>
      <hv:vm xmlns:hv="https://smallstack-hypervisor.org/xmlns/vm/1">
        <hv:ipAddress>10.2.3.4</hv:ipAddress>
      </hv:vm>
    </metadata>
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol
from xml.etree import ElementTree

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

METADATA_NAMESPACE = "https://smallstack-hypervisor.org/xmlns/vm/1"
METADATA_PREFIX = "hv"

# virDomainState -> our words (libvirt's own names, lower case)
DOMAIN_STATES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutting down",
    5: "shut off",
    6: "crashed",
    7: "suspended",
}


@dataclass(frozen=True)
class DomainSummary:
    """
    What the daemon keeps in memory about one libvirt domain.
    """

    name: str
    uuid: str
    state: str
    active: bool
    ours: bool
    ip_address: Optional[str]
    hypervisor: str = ""  # the uuid of the hypervisor that made it ("" = not said)


def our_metadata(dom: Any) -> Optional[ElementTree.Element]:
    """
    Return our metadata element of C{dom}, or None if the domain is not ours.
    """
    import libvirt

    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE, 0)
    except libvirt.libvirtError:
        return None
    try:
        return ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return None


def summarize(dom: Any) -> DomainSummary:
    """
    Read one domain's name, UUID, state and our metadata.
    """
    state, _ = dom.state()
    element = our_metadata(dom)
    ip = None
    if element is not None:
        ip_element = element.find("ipAddress")
        if ip_element is None:
            ip_element = element.find(f"{{{METADATA_NAMESPACE}}}ipAddress")
        ip = ip_element.text if ip_element is not None else None
    return DomainSummary(
        hypervisor=_hypervisor_of(element),
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=DOMAIN_STATES.get(state, f"state {state}"),
        active=bool(dom.isActive()),
        ours=element is not None,
        ip_address=ip,
    )


def list_domains(conn: Any) -> list[DomainSummary]:
    """
    Summarize every domain (running or defined) on the connection.
    """
    import libvirt

    out = []
    for dom in conn.listAllDomains(0):
        try:
            out.append(summarize(dom))
        except libvirt.libvirtError as e:
            # The domain vanished between the list and the look: skip it.
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return out


def request_shutdown(conn: Any, uuid: str) -> bool:
    """
    Ask a domain to power down (ACPI); return False if it is not running any more.
    """
    import libvirt

    try:
        dom = conn.lookupByUUIDString(uuid)
        if not dom.isActive():
            return False
        dom.shutdown()
        return True
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            return False
        raise


def is_active(conn: Any, uuid: str) -> bool:
    """
    Whether the domain exists and runs.
    """
    import libvirt

    try:
        return bool(conn.lookupByUUIDString(uuid).isActive())
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise


def force_off(conn: Any, uuid: str) -> bool:
    """
    Force a domain off (libvirt's destroy: pull the plug; the definition stays).

    @return: whether it was running.
    """
    import libvirt

    try:
        dom = conn.lookupByUUIDString(uuid)
        if not dom.isActive():
            return False
        dom.destroy()
        return True
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            return False
        raise


KVM_PROBE_XML = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <cpu mode='host-passthrough'/>
  <devices><serial type='null'/></devices>
</domain>"""


PROBE_PREFIX = "smallstack-hypervisor-kvm-probe-"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_probes(conn: Any) -> list[str]:
    """
    Destroy the KVM probe guests of daemons that died during their probe: a daemon
    killed in the second its probe runs leaves a transient guest running with nobody
    to stop it. A probe is named C{<prefix><pid namespace>-<pid>}; only probes of
    this PID namespace whose process is gone are destroyed (a live daemon's probe,
    here or in another PID namespace, is left alone).

    @return: the names of the guests destroyed.
    """
    import libvirt

    removed = []
    mine = _pid_namespace()
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        name = dom.name()
        if not name.startswith(PROBE_PREFIX):
            continue
        namespace, _, pid = name[len(PROBE_PREFIX) :].rpartition("-")
        # no namespace: named before namespaces were (taken as this one's)
        if namespace not in (mine, "") or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            dom.destroy()
        except libvirt.libvirtError:
            continue  # gone meanwhile
        removed.append(name)
    return removed


def probe_kvm(conn: Any, settle: float = 1.0) -> tuple[bool, str]:
    """
    Decide whether KVM guests really run here: start a tiny transient KVM domain with
    the host's CPU (as our KVM guests use) and see that it is still running after
    C{settle} seconds. Probe guests left by daemons killed while probing are
    destroyed first (L{remove_stale_probes}).

    Hosts with a paravirtual (PVM) KVM expose C{/dev/kvm}, but QEMU aborts there with
    the host CPU model; a capability check alone would say yes.

    @return: C{(usable, reason)}.
    """
    import libvirt

    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    except libvirt.libvirtError as e:
        return False, f"libvirt reports no KVM support: {e.get_error_message()}"
    remove_stale_probes(conn)
    name = f"{PROBE_PREFIX}{_pid_namespace()}-{os.getpid()}"
    try:
        dom = conn.createXML(KVM_PROBE_XML.format(name=name), 0)
    except libvirt.libvirtError as e:
        lines = (e.get_error_message() or str(e)).strip().splitlines() or [str(e)]
        # QEMU's own "error:" line says most (e.g. "failed to set MSR 0x10a").
        line = next((x for x in lines if "error:" in x), lines[-1])
        return False, f"a KVM guest failed to start: {line.split('error:', 1)[-1].strip()}"
    try:
        time.sleep(settle)
        running = bool(dom.isActive()) and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    except libvirt.libvirtError as e:
        return False, f"the KVM probe guest died: {e.get_error_message()}"
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
    if not running:
        return False, "the KVM probe guest did not stay running"
    return True, "a KVM guest with the host CPU started and kept running"


def create(conn: Any, xml: str) -> str:
    """
    Start a transient domain from C{xml}; return its UUID.
    """
    return str(conn.createXML(xml, 0).UUIDString())


def _hypervisor_of(element: Optional[ElementTree.Element]) -> str:
    if element is None:
        return ""
    found = element.find(f"{{{METADATA_NAMESPACE}}}hypervisor")
    if found is None:
        found = element.find("hypervisor")
    return (found.text or "") if found is not None else ""


def uuid_of(conn: Any, name: str, owner: str = "") -> Optional[str]:
    """
    The UUID of the domain called C{name}, or None if there is none — or if C{owner}
    is given and the domain says it belongs to another hypervisor (two daemons on one
    libvirtd, as in the migration tests: the source must never touch the target's
    domain of the same VM).
    """
    import libvirt

    try:
        dom = conn.lookupByName(name)
        if owner:
            made_by = _hypervisor_of(our_metadata(dom))
            if made_by and made_by != owner:
                return None
        return str(dom.UUIDString())
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def send_ctrl_alt_del(conn: Any, uuid: str) -> None:
    """
    Press Ctrl-Alt-Del in the guest (as the Go hypervisor reboots).
    """
    import libvirt

    # KEY_LEFTCTRL, KEY_LEFTALT, KEY_DELETE
    conn.lookupByUUIDString(uuid).sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 0, [29, 56, 111], 3, 0)


def vnc_socket(conn: Any, uuid: str) -> str:
    """
    The unix socket of the running domain's VNC server (libvirt picks it for
    C{<listen type='socket'/>}), or "" if it has none.
    """
    root = ElementTree.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(0))
    for graphics in root.findall("devices/graphics"):
        if graphics.get("type") == "vnc":
            return graphics.get("socket") or ""
    return ""


class IDomains(Protocol):
    """
    The domain operations the manager uses, each returning a Deferred; the real one is
    L{Domains} (libvirt, on its thread pool), the fake one
    L{hypervisor.testing.FakeDomains}.

    """

    @property
    def connected(self) -> bool:
        """
        Whether libvirt is connected now.
        """

    def describe(self) -> str:
        """
        The connection state, as a sentence.
        """

    def add_listener(self, listener: Any) -> None:
        """
        Tell C{listener} about connections and lifecycle events
        (L{hypervisor.virt.connection.IConnectionListener}).
        """

    def keep_open_until(self, d: "Deferred[Any]") -> None:
        """
        Keep the connection open at stop until C{d} fires.
        """

    def list(self) -> "Deferred[list[DomainSummary]]":
        """
        Every domain.
        """

    def create(self, xml: str) -> "Deferred[str]":
        """
        Start a transient domain; fires with its UUID.
        """

    def uuid_of(self, name: str) -> "Deferred[Optional[str]]":
        """
        The UUID of the domain with this name, or None.
        """

    def request_shutdown(self, uuid: str) -> "Deferred[bool]":
        """
        ACPI power-down; False if it was not running.
        """

    def is_active(self, uuid: str) -> "Deferred[bool]":
        """
        Whether it runs.
        """

    def force_off(self, uuid: str) -> "Deferred[bool]":
        """
        Pull the plug; whether it was running.
        """

    def send_ctrl_alt_del(self, uuid: str) -> "Deferred[None]":
        """
        Ctrl-Alt-Del.
        """

    def probe_kvm(self) -> "Deferred[tuple[bool, str]]":
        """
        Whether KVM guests run here, and why.
        """

    def vnc_socket(self, uuid: str) -> "Deferred[str]":
        """
        The running domain's VNC socket ("" if none).
        """


class Domains:
    """
    L{IDomains} over a L{hypervisor.virt.connection.LibvirtService}: every call runs on
    its thread pool; without a connection each fails with C{NotConnected} (HTTP 503).
    """

    def __init__(self, service: Any) -> None:
        self.service = service
        self.owner = ""  # this hypervisor's uuid (set by the manager): see uuid_of

    @property
    def connected(self) -> bool:
        """
        Whether libvirt is connected now.
        """
        return bool(self.service.connected)

    def describe(self) -> str:
        """
        The connection state, as a sentence.
        """
        return str(self.service.describe())

    def add_listener(self, listener: Any) -> None:
        """
        Register a connection listener with the service.
        """
        self.service.add_listener(listener)

    def keep_open_until(self, d: "Deferred[Any]") -> None:
        """
        Keep the connection open at stop until C{d} fires.
        """
        self.service.keep_open_until(d)

    def list(self) -> "Deferred[list[DomainSummary]]":
        """
        Every domain.
        """
        return self.service.call(list_domains)

    def create(self, xml: str) -> "Deferred[str]":
        """
        Start a transient domain.
        """
        return self.service.call(create, xml)

    def uuid_of(self, name: str) -> "Deferred[Optional[str]]":
        """
        The UUID of a domain by name.
        """
        return self.service.call(uuid_of, name, self.owner)

    def request_shutdown(self, uuid: str) -> "Deferred[bool]":
        """
        ACPI power-down.
        """
        return self.service.call(request_shutdown, uuid)

    def is_active(self, uuid: str) -> "Deferred[bool]":
        """
        Whether it runs.
        """
        return self.service.call(is_active, uuid)

    def force_off(self, uuid: str) -> "Deferred[bool]":
        """
        Pull the plug.
        """
        return self.service.call(force_off, uuid)

    def send_ctrl_alt_del(self, uuid: str) -> "Deferred[None]":
        """
        Ctrl-Alt-Del.
        """
        return self.service.call(send_ctrl_alt_del, uuid)

    def probe_kvm(self) -> "Deferred[tuple[bool, str]]":
        """
        Whether KVM guests run here.
        """
        return self.service.call(probe_kvm)

    def vnc_socket(self, uuid: str) -> "Deferred[str]":
        """
        The running domain's VNC socket ("" if none).
        """
        return self.service.call(vnc_socket, uuid)
