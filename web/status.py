# -*- test-case-name: tests.test_pages -*-
"""
The status pages on port 6976, with the Go hypervisor's paths and query conventions
(reference §3): C{/}, C{/listVMs}, C{/showVM?<IP>}, C{/showVmBootLog?<IP>},
C{/listSubnets}, C{/listAvailableAddresses}, C{/listRegisteredAddresses},
C{/listVolumeDirectories}, C{/showVolumeDirectories}, C{/showDhcpStatus}, C{/logs}
(C{/logs/showLast?1m}, C{/logs/dump}, C{/logs/file?NAME}), C{/metrics}, C{/healthz}.

A L{StatusPages} object holds its own Klein app (no module-global app) and reads only
in-memory state of the manager and the libvirt service (summaries from
L{hypervisor.manager.report}): rendering never waits on libvirt. Every page carries
the reference's security headers; unknown VMs and bad queries get a friendly 404/400
page (or a JSON error for C{output=json}).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import urllib.parse
from typing import Any, Optional

import jinja2
from klein import Klein
from twisted.internet.threads import deferToThread
from twisted.web.server import Request

import hypervisor
from hypervisor import codec, flags
from hypervisor.logs import LogBuffer
from hypervisor.manager import report
from hypervisor.manager.manager import Manager
from hypervisor.metrics import Metrics
from hypervisor.model import State
from hypervisor.virt.connection import LibvirtService

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
STATIC = os.path.join(HERE, "static")
BOOTLOG_MAX = 4 * 1024 * 1024

SECURITY_HEADERS = {
    b"X-Frame-Options": b"DENY",
    b"X-XSS-Protection": b"1",
    b"Content-Security-Policy": b"default-src 'self' ;style-src 'self' 'unsafe-inline'",
    b"X-Content-Type-Options": b"nosniff",
}

CONTENT_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript",
                 ".png": b"image/png", ".svg": b"image/svg+xml"}

HTML = b"text/html; charset=utf-8"
TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"


def load_assets() -> dict[str, tuple[bytes, bytes]]:
    """
    Read the files of C{web/static} once: name -> (content type, bytes).
    """
    assets = {}
    for name in os.listdir(STATIC):
        content_type = CONTENT_TYPES.get(os.path.splitext(name)[1])
        if content_type is not None:
            with open(os.path.join(STATIC, name), "rb") as f:
                assets[name] = (content_type, f.read())
    return assets


def format_uptime(seconds: float) -> str:
    """
    Format a duration for people: C{3d 4h 5m 6s}.
    """
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{seconds}s")
    return " ".join(parts)


def format_time(value: Any) -> str:
    """
    A timestamp (datetime or seconds) as C{2026-01-02 03:04:05 UTC}.
    """
    if value is None:
        return ""
    if not isinstance(value, datetime.datetime):
        value = datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def make_environment() -> jinja2.Environment:
    """
    The Jinja2 environment for our templates, autoescaping on.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["duration"] = format_uptime
    env.filters["bytes"] = report.human_bytes
    env.filters["time"] = format_time
    env.filters["mib"] = lambda n: report.human_bytes((n or 0) * 1024 * 1024)
    return env


def split_query(request: Request) -> tuple[list[str], dict[str, str]]:
    """
    The Go pages' queries: C{/showVM?10.0.0.2&output=json} -> (["10.0.0.2"],
    {"output": "json"}).
    """
    raw = request.uri.decode("latin-1").partition("?")[2]
    positional: list[str] = []
    params: dict[str, str] = {}
    for part in raw.split("&"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = urllib.parse.unquote_plus(key)
        if sep:
            params[key] = urllib.parse.unquote_plus(value)
        else:
            positional.append(key)
    return positional, params


class StatusPages:
    """
    The status pages of one daemon.
    """

    app = Klein()

    def __init__(
        self, manager: Manager, libvirt: LibvirtService, hostname: str = "",
        metrics: Optional[Metrics] = None, logs: Optional[LogBuffer] = None,
        log_dir: str = "",
    ) -> None:
        self.manager = manager
        self.libvirt = libvirt
        self.hostname = hostname or socket.gethostname()
        self.metrics = metrics or Metrics()
        self.logs = logs or LogBuffer()
        self.log_dir = log_dir
        self.templates = make_environment()
        self.assets = load_assets()

    def resource(self) -> Any:
        """
        The Twisted resource serving these pages.
        """
        return self.app.resource()

    # helpers -------------------------------------------------------------------

    def _headers(self, request: Request, content_type: bytes) -> None:
        request.setHeader(b"Content-Type", content_type)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)

    def _render(self, request: Request, template: str, **context: Any) -> str:
        self._headers(request, HTML)
        m = self.manager
        return self.templates.get_template(template).render(
            hostname=self.hostname, version=hypervisor.__version__,
            disabled=m.disabled, now=format_time(self.manager.reactor.seconds()),
            **context)

    def _error(self, request: Request, status: int, message: str,
               as_json: bool = False) -> str:
        request.setResponseCode(status)
        if as_json:
            self._headers(request, JSON)
            return json.dumps({"Error": message}) + "\n"
        return self._render(request, "error.html", status=status, message=message)

    def _json(self, request: Request, data: Any) -> bytes:
        self._headers(request, JSON)
        return json.dumps(codec.encode_value(data), indent=4).encode() + b"\n"

    # pages -----------------------------------------------------------------------

    @app.route("/", branch=False)
    def index(self, request: Request) -> str:
        """
        The host summary page.
        """
        m = self.manager
        infos = [vm.info for vm in m.vms.values()]
        total_mib, available_mib = m.host.memory()
        allocated_mib = sum(i.MemoryInMiB for i in infos)
        cpus = m.host.num_cpus()
        allocated_cpu = sum(i.MilliCPUs for i in infos)
        doms = list(m.domains.values())
        return self._render(
            request, "index.html",
            uuid=m.state.uuid,
            start_time=format_time(m.start_time) if m.start_time else "not started",
            uptime=m.uptime,
            libvirt_uri=self.libvirt.uri,
            libvirt_connected=self.libvirt.connected,
            libvirt_state=self.libvirt.describe(),
            libvirt_reconnects=max(0, self.libvirt.connects - 1),
            domains_current=m.domains_current,
            num_domains=len(doms),
            num_running=sum(1 for d in doms if d.active),
            num_ours=sum(1 for d in doms if d.ours),
            domain_type=m.domain_type or "not decided yet",
            domain_type_reason=m.domain_type_reason,
            state_dir=m.state.path,
            states=report.states(infos),
            num_vms=len(infos),
            cpus=cpus, allocated_cpu=allocated_cpu,
            total_mib=total_mib, available_mib=available_mib, allocated_mib=allocated_mib,
            pool=report.pool_by_subnet(m.pool.free, m.pool.registered,
                                       m._addresses_in_use(), m.subnets),
            subnets=m.subnets.list(sort=True),
            volume_directories=report.volume_directories(m.volume_directories, m.host),
            owners=sorted(m.owner_users) + [f"group {g}" for g in sorted(m.owner_groups)],
        )

    @app.route("/listVMs", branch=False)
    def list_vms(self, request: Request) -> Any:
        """
        The VM table, or its JSON/text forms; filters C{state=} and C{primaryOwner=}.
        """
        _, params = split_query(request)
        output = params.get("output", "html")
        state = params.get("state", "")
        if state and state not in {s.value for s in State}:
            return self._error(request, 400, f"unknown state {state!r}; states are: "
                               + ", ".join(s.value for s in State), output == "json")
        if output not in ("html", "json", "text"):
            return self._error(request, 400, f"unknown output {output!r}; use json or text")
        m = self.manager
        infos = report.select([vm.info for vm in m.vms.values()], state,
                              params.get("primaryOwner", ""))
        if output == "json":
            return self._json(request, infos)
        if output == "text":
            self._headers(request, TEXT)
            return "".join(f"{i.ip}\n" for i in infos)
        rows = [report.vm_row(i, m.host.num_cpus()) for i in infos]
        total, owners = report.totals(rows)
        total_mib, _ = m.host.memory()
        capacity_storage = sum(v.Size for v in report.volume_directories(
            m.volume_directories, m.host))
        return self._render(
            request, "list_vms.html", rows=rows, total=total, owners=owners,
            state=state, primary_owner=params.get("primaryOwner", ""),
            states=[s.value for s in State],
            capacity={"memory_mib": total_mib, "milli_cpus": m.host.num_cpus() * 1000,
                      "vcpus": m.host.num_cpus(), "storage": capacity_storage})

    @app.route("/showVM", branch=False)
    def show_vm(self, request: Request) -> Any:
        """
        One VM in full; C{&output=json} for its VmInfo.
        """
        positional, params = split_query(request)
        as_json = params.get("output") == "json"
        if len(positional) != 1:
            return self._error(request, 400, "give one IP address: /showVM?10.2.3.4",
                               as_json)
        ip = positional[0]
        vm = self.manager.vms.get(ip)
        if vm is None or vm.deleted:
            return self._error(request, 404, f"no VM with IP {ip}", as_json)
        if as_json:
            return self._json(request, vm.info)
        info = vm.info
        volumes = [
            {"index": i, "volume": v,
             "file": vm.local.VolumeLocations[i].Filename
             if i < len(vm.local.VolumeLocations) else ""}
            for i, v in enumerate(info.Volumes)]
        return self._render(
            request, "show_vm.html", info=info, volumes=volumes,
            row=report.vm_row(info, self.manager.host.num_cpus()),
            info_json=json.dumps(codec.encode_value(info), indent=4),
            has_bootlog=os.path.exists(os.path.join(vm.directory, "bootlog")))

    @app.route("/showVmBootLog", branch=False)
    async def show_boot_log(self, request: Request) -> Any:
        """
        The VM's serial output as text (CRLF -> LF); C{&tail=N} for the last N lines.
        """
        positional, params = split_query(request)
        if len(positional) != 1:
            return self._error(request, 400, "give one IP address: /showVmBootLog?10.2.3.4")
        vm = self.manager.vms.get(positional[0])
        if vm is None or vm.deleted:
            return self._error(request, 404, f"no VM with IP {positional[0]}")
        tail = params.get("tail", "")
        if tail and not tail.isdigit():
            return self._error(request, 400, f"tail={tail!r} is not a number of lines")
        text = await deferToThread(_read_tail, os.path.join(vm.directory, "bootlog"),
                                   BOOTLOG_MAX)
        text = text.replace("\r\n", "\n")
        if tail:
            text = "\n".join(text.splitlines()[-int(tail):]) + "\n"
        self._headers(request, TEXT)
        return text

    @app.route("/listSubnets", branch=False)
    def list_subnets(self, request: Request) -> bytes:
        """
        Subnets as JSON.
        """
        return self._json(request, self.manager.subnets.list(sort=True))

    @app.route("/listAvailableAddresses", branch=False)
    def list_available(self, request: Request) -> bytes:
        """
        Free addresses as JSON.
        """
        return self._json(request, self.manager.pool.free)

    @app.route("/listRegisteredAddresses", branch=False)
    def list_registered(self, request: Request) -> bytes:
        """
        Registered addresses as JSON.
        """
        return self._json(request, self.manager.pool.registered)

    @app.route("/listVolumeDirectories", branch=False)
    def list_volume_directories(self, request: Request) -> str:
        """
        Volume directories, one per line.
        """
        self._headers(request, TEXT)
        return "".join(f"{d}\n" for d in self.manager.volume_directories)

    @app.route("/showVolumeDirectories", branch=False)
    def show_volume_directories(self, request: Request) -> bytes:
        """
        Volume directories with mount point and space, as JSON.
        """
        return self._json(request, [
            {"Directory": d.Directory, "CanTrim": d.CanTrim, "MountPoint": d.MountPoint,
             "Size": d.Size, "Available": d.Available}
            for d in report.volume_directories(self.manager.volume_directories,
                                               self.manager.host)])

    @app.route("/showDhcpStatus", branch=False)
    def show_dhcp_status(self, request: Request) -> str:
        """
        The DHCP server's interfaces and leases.
        """
        m = self.manager
        leases = sorted(
            ((vm.info.Address.MacAddress, vm.ip, vm.info.Hostname, vm.info.SubnetId)
             for vm in m.vms.values()), key=lambda lease: report._ip_key(lease[1]))
        return self._render(request, "dhcp.html", dhcp_running=m.dhcp_acks is not None,
                            leases=leases)

    @app.route("/logs", branch=False)
    def logs_page(self, request: Request) -> str:
        """
        The latest log lines and the log files.
        """
        _, params = split_query(request)
        return self._render(request, "logs.html", lines=list(self.logs.lines)[-500:],
                            files=self._log_files(), window="", total=len(self.logs.lines))

    @app.route("/logs/showLast", branch=False)
    def logs_last(self, request: Request) -> str:
        """
        The lines of the last window (C{?1m}, C{?30s}, C{?2h}).
        """
        positional, _ = split_query(request)
        window = positional[0] if positional else "1m"
        try:
            seconds = flags.parse_duration(window)
        except ValueError as e:
            return self._error(request, 400, f"bad window: {e}")
        lines = self.logs.since(self.manager.reactor.seconds() - seconds)
        return self._render(request, "logs.html", lines=lines, files=self._log_files(),
                            window=window, total=len(self.logs.lines))

    @app.route("/logs/dump", branch=False)
    def logs_dump(self, request: Request) -> str:
        """
        Every remembered line, as text.
        """
        self._headers(request, TEXT)
        return "".join(f"{format_time(line.time)} [{line.level}] {line.namespace}: "
                       f"{line.text}\n" for line in self.logs.lines)

    @app.route("/logs/file", branch=False)
    async def logs_file(self, request: Request) -> Any:
        """
        A log file of C{-logDir} (by name, from the listing only), as text.
        """
        positional, _ = split_query(request)
        names = {name for name, _ in self._log_files()}
        if len(positional) != 1 or positional[0] not in names:
            return self._error(request, 404, "no such log file; /logs lists them")
        text = await deferToThread(_read_tail, os.path.join(self.log_dir, positional[0]),
                                   BOOTLOG_MAX)
        self._headers(request, TEXT)
        return text

    def _log_files(self) -> list[tuple[str, int]]:
        try:
            names = sorted(os.listdir(self.log_dir)) if self.log_dir else []
        except OSError:
            return []
        out = []
        for name in names:
            path = os.path.join(self.log_dir, name)
            if os.path.isfile(path):
                out.append((name, os.path.getsize(path)))
        return out

    @app.route("/metrics", branch=False)
    def metrics_page(self, request: Request) -> bytes:
        """
        Prometheus metrics (text format).
        """
        request.setHeader(b"Content-Type", self.metrics.content_type.encode())
        return self.metrics.text()

    @app.route("/healthz", branch=False)
    def healthz(self, request: Request) -> bytes:
        """
        C{200 ok} when libvirt is connected, else 503 with the reason.
        """
        self._headers(request, TEXT)
        if self.libvirt.connected:
            return b"ok\n"
        request.setResponseCode(503)
        return (self.libvirt.describe() + "\n").encode("utf-8")

    @app.route("/static/<name>", branch=False)
    def static(self, request: Request, name: str) -> bytes:
        """
        Our CSS (no external assets: hosts may have no internet).
        """
        asset = self.assets.get(name)
        if asset is None:
            request.setResponseCode(404)
            self._headers(request, TEXT)
            return b"no such file\n"
        content_type, body = asset
        self._headers(request, content_type)
        request.setHeader(b"Cache-Control", b"max-age=3600")
        return body

    @app.handle_errors(Exception)  # type: ignore[arg-type]
    def unexpected(self, request: Request, failure: Any) -> str:
        """
        Anything unexpected: logged, and a friendly 500 page without the traceback.
        """
        from werkzeug.exceptions import NotFound as RouteNotFound

        if failure.check(RouteNotFound):
            return self._error(request, 404, f"no page at {request.path.decode()!r}")
        from twisted.logger import Logger

        Logger().failure("page {path} failed", failure, path=request.path)
        return self._error(request, 500, "internal error; the log has the details")


def _read_tail(path: str, limit: int) -> str:
    """
    The last C{limit} bytes of a file, as text ("" if it does not exist).
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", "replace")
