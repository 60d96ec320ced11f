# -*- test-case-name: tests.test_options,tests.test_cli -*-
"""
The daemon's flags: the Go hypervisor's names and defaults, plus ours.

Defaults come from the table below, then from C{flags.default} and C{flags.extra} in
the flags directory (C{/etc/hypervisor}, or C{$HYPERVISOR_FLAGS_DIRECTORY}), then from
the command line, which wins. Go-style single-dash flags are accepted.

Some Go flags are accepted so that the Go daemon's flags files and command lines keep
working, but nothing reads them yet: they are listed in L{NOT_USED_YET} and marked so
in C{-h}. Whoever makes one of them do something takes it out of that set (a test in
C{tests.test_options} checks that the set matches what the daemon reads).

C{tap.options} re-exports this module for twistd; the C{hypervisor} command imports
it from here.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from twisted.python import usage

from hypervisor import flags

SECTION_OURS = "(ours)"

NOT_USED_MARK = "(accepted for compatibility; not used yet)"

# Go flags that are parsed and validated but that nothing reads yet.
NOT_USED_YET: frozenset[str] = frozenset(
    {
        "tftpbootImageStream",
        "username",
        "lockCheckInterval",
        "lockLogTimeout",
        "identityProvider",
        "showVGA",
        # Go flags that do not apply here (-h says why):
        "addHypervisorSubnet",
        "alsoLogToStderr",
        "initialLogDebugLevel",
        "logSubseconds",
        "srpcClientDoNotUseMethodPowers",
        "srpcProxy",
        "srpcTrustVmOwners",
        "srpcUnixSocketPath",
    }
)

# Go boolean flags whose default is true.
BOOLEANS_DEFAULT_TRUE: frozenset[str] = frozenset({"logAtStartup", "srpcTrustVmOwners"})

DOMAIN_TYPES = ("auto", "kvm", "qemu")
DATASOURCES = ("openstack", "nocloud", "none")


def _integer(low: int, high: Optional[int], what: str) -> Callable[[str], int]:
    """
    A flag's integer from C{low} to C{high} (None: no upper bound); any other text is
    refused as not being C{what}.
    """

    def coerce(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high):
            raise ValueError(f"{text!r} is not {what}")
        return value

    return coerce


_port = _integer(0, 65535, "a port number (0 to 65535)")
_count = _integer(0, None, "a non-negative number")
_tftp_block_size = _integer(8, 65464, "a TFTP block size (8 to 65464)")
_spin_microseconds = _integer(0, 10000, "a number of microseconds from 0 to 10000")


def _domain_type(text: str) -> str:
    if text not in DOMAIN_TYPES:
        raise ValueError(f"{text!r} is not one of {', '.join(DOMAIN_TYPES)}")
    return text


def _datasource(text: str) -> str:
    if text not in DATASOURCES:
        raise ValueError(f"{text!r} is not one of {', '.join(DATASOURCES)}")
    return text


def _directories(text: str) -> list[str]:
    return [d for d in (p.strip() for p in text.split(",")) if d]


def _absolute(text: str) -> str:
    if text and not os.path.isabs(text):
        raise ValueError(f"{text!r} is not an absolute path")
    return text


def _uri(text: str) -> str:
    if not re.match(r"^[a-z][a-z0-9+]*://", text):
        raise ValueError(f"{text!r} is not a libvirt URI (example: qemu:///system)")
    return text


def _go_format(value: Any) -> Any:
    if isinstance(value, list):
        return ",".join(value)
    return value


# name, default (as text, parsed by coerce), coerce, help
PARAMETERS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("stateDir", "/var/lib/hypervisor", _absolute, "Name of state directory"),
    ("portNum", "6976", _port, "Port number for status pages and RPC"),
    (
        "volumeDirectories",
        "",
        _directories,
        "Comma separated list of volume directories (default: auto-detect)",
    ),
    (
        "imageServerHostname",
        "localhost",
        str,
        "Hostname of the image server (for ImageName: ours is plain HTTPS, GET "
        "/images/<name>, with the daemon's -certFile as client certificate; run one with "
        "'hypervisor serve-images DIR')",
    ),
    ("imageServerPortNum", "6971", _port, "Port number of the image server"),
    (
        "networkBootImage",
        "pxelinux.%d",
        str,
        "Name of boot image passed via DHCP option (%d = client architecture)",
    ),
    ("tftpbootImageStream", "", str, "Image stream from which TFTP boot files come"),
    (
        "tftpbootDirectory",
        "",
        _absolute,
        f"{SECTION_OURS} directory the TFTP server serves after a client's NetbootMachine "
        "files (a leading /tftpboot in names is stripped; nothing outside it is served); "
        "in place of the Go daemon's -tftpbootImageStream: unpack that image's files here "
        "(default: NetbootMachine files only)",
    ),
    ("tftpPortNum", "69", _port, f"{SECTION_OURS} UDP port of the TFTP server (0: no TFTP)"),
    (
        "pbPortNum",
        "8787",
        _port,
        f"{SECTION_OURS} TCP port of the Perspective Broker admin service (TLS with a client "
        "certificate; hyper-control -transport pb, hypervisor.client; 0: none)",
    ),
    (
        "torControl",
        "",
        str,
        f"{SECTION_OURS} with -pbOnion: the control port of a tor you run on this host, as a "
        "Twisted client endpoint string (unix:/run/tor/control, tcp:127.0.0.1:9051; cookie "
        "authentication); empty: the daemon launches its own tor (DataDirectory "
        "<stateDir>/tor), which needs to reach the Tor network",
    ),
    (
        "torConfigFile",
        "",
        _absolute,
        f"{SECTION_OURS} with -pbOnion and no -torControl: a torrc file the tor the daemon "
        "launches includes (%include), e.g. bridges (UseBridges, Bridge) or a proxy",
    ),
    (
        "tftpMaxBlockSize",
        "65464",
        _tftp_block_size,
        f"{SECTION_OURS} largest TFTP blksize granted (8 to 65464; a transfer's path MTU "
        "also limits it)",
    ),
    (
        "tftpTransferThreads",
        "16",
        _count,
        f"{SECTION_OURS} TFTP transfers that may run on a thread of their own at a time (a "
        "blocking loop on the transfer's port: the fastest path for a transfer that "
        "starts when no other is in progress); the others run on the event loop, where "
        "many transfers together do better (0: all do)",
    ),
    (
        "tftpSpinMicroseconds",
        "200",
        _spin_microseconds,
        f"{SECTION_OURS} how long a TFTP transfer thread polls for the client's next ACK "
        "before it sleeps (0 to 10000; 0: never polls): a sleeping thread's wakeup is most "
        "of a lock-step round trip on a fast link; given up while the client is slower",
    ),
    (
        "localImagesDirectory",
        "",
        _absolute,
        "Directory from which file:// image URLs may be read",
    ),
    (
        "objectCacheDirectory",
        "",
        _absolute,
        "Directory for the object cache (default: objectcache beside the first volume "
        "directory): images fetched for ImageURL, kept by content digest; root volumes "
        "are qcow2 overlays on them",
    ),
    ("objectCacheSize", "10G", flags.parse_size, "Maximum size of the object cache"),
    ("username", "nobody", str, "Username to run the virtualiser as"),
    (
        "lockCheckInterval",
        "2s",
        flags.parse_duration,
        "Interval between checks for lock timeouts",
    ),
    (
        "lockLogTimeout",
        "5s",
        flags.parse_duration,
        "Timeout before logging that a lock has been held too long",
    ),
    ("identityProvider", "", str, "URL of the Identity Provider"),
    (
        "CAfile",
        "/etc/ssl/CA.pem",
        str,
        "Name of file containing the root of trust for identity and methods",
    ),
    (
        "identityCAfile",
        "/etc/ssl/IdentityCA.pem",
        str,
        "Name of file containing the root of trust for identity only",
    ),
    (
        "certFile",
        "/etc/ssl/hypervisor/cert.pem",
        str,
        "Name of file containing the SSL certificate",
    ),
    ("keyFile", "/etc/ssl/hypervisor/key.pem", str, "Name of file containing the SSL key"),
    ("logDir", "/var/log/hypervisor", _absolute, "Directory for the JSON log file"),
    (
        "logFileMaxSize",
        "10M",
        flags.parse_size,
        "Maximum size for a log file. If exceeded, new file is created",
    ),
    ("logQuota", "100M", flags.parse_size, "Log quota. If exceeded, old logs are deleted"),
    ("logbufLines", "1024", _count, "Number of lines to store in the log buffer (/logs pages)"),
    (
        "idleMarkTimeout",
        "0s",
        flags.parse_duration,
        "time after last log before a 'MARK' message is written to logfile (0: never)",
    ),
    (
        "initialLogDebugLevel",
        "-1",
        int,
        "initial debug log level (Go's debug levels; this daemon logs by twisted.logger " "levels)",
    ),
    (
        "testMemoryAvailable",
        "0",
        _count,
        "test if memory is allocatable and exit (units of MiB)",
    ),
    ("srpcProxy", "", str, "Proxy to use (the daemon makes no SRPC client calls)"),
    (
        "srpcUnixSocketPath",
        f"@SRPC.{os.getpid()}",
        str,
        "Pathname for server Unix sockets (SRPC clients on this host stay on TCP: "
        ".LocalUpgradeToUnix is refused)",
    ),
    ("libvirtUri", "qemu:///system", _uri, f"{SECTION_OURS} libvirt connection URI"),
    (
        "domainType",
        "auto",
        _domain_type,
        f"{SECTION_OURS} libvirt domain type: kvm, qemu (TCG), or auto "
        "(kvm only if a KVM guest really starts on this host)",
    ),
    (
        "cloudInitDatasource",
        "openstack",
        _datasource,
        f"{SECTION_OURS} cloud-init datasource VMs advertise in SMBIOS unless their "
        "CloudInitDatasource says otherwise: openstack, nocloud or none",
    ),
    (
        "dhcpMetadataRoute",
        "true",
        flags.parse_bool,
        f"{SECTION_OURS} DHCP option 121 (RFC 3442) gives clients that ask for it a route "
        "to the metadata server 169.254.169.254 and the default route, both via the "
        "subnet's gateway (true or false)",
    ),
    (
        "metadataServer",
        "true",
        flags.parse_bool,
        f"{SECTION_OURS} serve the metadata server (169.254.169.254, in a network "
        "namespace per bridge) to VMs (true or false)",
    ),
    (
        "vmShutdownTimeout",
        "1m",
        flags.parse_duration,
        f"{SECTION_OURS} on a stop after stop-vms-on-next-stop: how long VMs get to "
        "power down (ACPI) before they are forced off",
    ),
    (
        "imageTimeout",
        "10m",
        flags.parse_duration,
        f"{SECTION_OURS} longest time an http(s) ImageURL download may take (a request's "
        "ImageTimeout may only shorten it)",
    ),
    (
        "imageMaxSize",
        "64G",
        flags.parse_size,
        f"{SECTION_OURS} largest image an http(s) ImageURL may download",
    ),
    (
        "imageCAfile",
        "",
        str,
        f"{SECTION_OURS} PEM file of the CAs trusted for https:// ImageURLs (default: the "
        "system's CAs)",
    ),
]

BOOLEANS: list[tuple[str, str]] = [
    (
        "allowUnauthenticatedReads",
        "If true, allow unauthenticated reads of VM and capacity information",
    ),
    ("dhcpServerOnBridgesOnly", "If true, run the DHCP server on bridge interfaces only"),
    (
        "pbOnion",
        f"{SECTION_OURS} If true, also publish the Perspective Broker service as a Tor onion "
        "service (key in <stateDir>/onion: a stable address; port -pbPortNum, or 8787; "
        "client certificates still decide access; see -torControl)",
    ),
    ("showVGA", "If true, show VGA console"),
    (
        "addHypervisorSubnet",
        "If true, automatically add the subnet for the default gateway (deprecated in Go)",
    ),
    (
        "alsoLogToStderr",
        "If true, also write logs to stderr ('hypervisor run' always does: it runs in the "
        "foreground)",
    ),
    ("logAtStartup", "If true, write a log entry at startup (default true)"),
    (
        "logSubseconds",
        "if true, datestamps will have subsecond resolution (the JSON log file always has)",
    ),
    (
        "srpcClientDoNotUseMethodPowers",
        "If true, do not use method powers when connecting to servers (the daemon makes no "
        "SRPC client calls)",
    ),
    (
        "srpcTrustVmOwners",
        "If true, trust the SmallStack VM owners for all method access (default true; "
        "applies to SRPC servers running inside a SmallStack VM, which this daemon is not)",
    ),
]

PARAMETER_NAMES = [p[0] for p in PARAMETERS]
BOOLEAN_NAMES = [b[0] for b in BOOLEANS]


# Each parameter gets a coercer that Twisted calls and whose message names the flag.
def _help(name: str, text: str) -> str:
    """
    The help line of flag C{name}, marked when the flag is accepted but not used yet.
    """
    return f"{text} {NOT_USED_MARK}" if name in NOT_USED_YET else text


def _named(name: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
    def checked(text: str) -> Any:
        try:
            return coerce(text)
        except ValueError as e:
            raise ValueError(f"flag -{name}: {e}") from None

    checked.coerceDoc = ""  # type: ignore[attr-defined]
    return checked


class Options(usage.Options):
    """
    Flags of the hypervisor daemon (C{twistd hypervisor} and C{hypervisor run}).

    @ivar flags_directory: where C{flags.default} and C{flags.extra} are read from.
    """

    synopsis = "[flags]"
    longdesc = (
        "Flags may be given Go-style (-stateDir /x, -portNum=6976) or GNU-style "
        "(--stateDir /x). Defaults are read from flags.default then flags.extra in "
        "the flags directory (/etc/hypervisor, or $HYPERVISOR_FLAGS_DIRECTORY), as "
        "name=value lines; the command line wins. "
        "Flags marked (ours) are not in the Go hypervisor. "
        f"Flags marked {NOT_USED_MARK} are Go flags that are parsed and checked, so "
        "that flags files and command lines written for the Go hypervisor keep "
        "working, but that change nothing yet: "
        + ", ".join(f"-{name}" for name in PARAMETER_NAMES + BOOLEAN_NAMES if name in NOT_USED_YET)
        + "."
    )

    optParameters = [
        [name, None, default, _help(name, help_), _named(name, coerce)]
        for name, default, coerce, help_ in PARAMETERS
    ]
    optFlags = [[name, None, _help(name, help_)] for name, help_ in BOOLEANS]

    def __init__(self, flags_directory: Optional[str] = None) -> None:
        super().__init__()
        if flags_directory is None:
            flags_directory = os.environ.get(
                "HYPERVISOR_FLAGS_DIRECTORY", flags.DEFAULT_FLAGS_DIRECTORY
            )
        self.flags_directory = flags_directory
        self._coerce = {name: coerce for name, _, coerce, _ in PARAMETERS}
        for name, default, coerce, _ in PARAMETERS:
            self[name] = coerce(default)
        for name in BOOLEAN_NAMES:
            self[name] = name in BOOLEANS_DEFAULT_TRUE

    def opt_h(self) -> None:
        """
        Display this help and exit.
        """
        self.opt_help()

    def _settings_from_files(self) -> list[tuple[str, str, str]]:
        """
        Read the flags files; validate each line on its own so errors name the line.
        """
        try:
            settings = flags.load_flags_files(self.flags_directory)
        except flags.FlagsFileError as e:
            raise usage.UsageError(str(e)) from e
        known = set(PARAMETER_NAMES) | set(BOOLEAN_NAMES)
        out = []
        for s in settings:
            if s.name not in known:
                raise usage.UsageError(f"{s.source}: unknown flag {s.name!r}")
            if s.name in self._coerce:
                try:
                    self._coerce[s.name](s.value)
                except ValueError as e:
                    raise usage.UsageError(f"{s.source}: flag -{s.name}: {e}") from e
            else:
                try:
                    flags.parse_bool(s.value)
                except ValueError as e:
                    raise usage.UsageError(f"{s.source}: flag -{s.name}: {e}") from e
            out.append((s.name, s.value, s.source))
        return out

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """
        Parse flags files, then the (Go- or GNU-style) command line.
        """
        if options is None:
            options = sys.argv[1:]
        file_args: list[str] = []
        file_bools: list[tuple[str, bool]] = []
        for name, value, _ in self._settings_from_files():
            if name in BOOLEAN_NAMES:
                file_bools.append((name, flags.parse_bool(value)))
            else:
                file_args.append(f"--{name}={value}")
        try:
            argv, bools = flags.normalize_argv(options, PARAMETER_NAMES, BOOLEAN_NAMES)
        except ValueError as e:
            raise usage.UsageError(str(e)) from e
        self._bool_assignments = file_bools + bools
        try:
            super().parseOptions(file_args + argv)
        except usage.UsageError as e:
            raise usage.UsageError(
                str(e).replace("Parameter type enforcement failed: ", "invalid value: ")
            ) from e

    def postOptions(self) -> None:
        """
        Apply boolean assignments in order (files first, then the command line).
        """
        for name, value in getattr(self, "_bool_assignments", []):
            self[name] = value

    def go_flags(self) -> list[str]:
        """
        Return the current settings as Go-style flags that parse back to the same.
        """
        out = []
        for name, default, _, _ in PARAMETERS:
            value = self[name]
            if name in ("objectCacheSize", "imageMaxSize", "logFileMaxSize", "logQuota"):
                value = flags.format_size(value)
            elif name in (
                "lockCheckInterval",
                "lockLogTimeout",
                "vmShutdownTimeout",
                "imageTimeout",
                "idleMarkTimeout",
            ):
                value = flags.format_duration(value)
            out.append(f"-{name}={_go_format(value)}")
        out.extend(f"-{name}={'true' if self[name] else 'false'}" for name in BOOLEAN_NAMES)
        return out
