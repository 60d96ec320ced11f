# -*- test-case-name: tests.test_pages -*-
"""
The status pages on port 6976, with the Go hypervisor's paths and query conventions
(reference §3): C{/}, C{/listVMs}, C{/showVM?<IP>}, C{/showVmBootLog?<IP>},
C{/listSubnets}, C{/listAvailableAddresses}, C{/listRegisteredAddresses},
C{/listVolumeDirectories}, C{/showVolumeDirectories}, C{/showDhcpStatus}, C{/logs}
(C{/logs/showLast?1m}, C{/logs/dump}, C{/logs/file?NAME}), C{/metrics}, C{/healthz}.

A L{StatusPages} object holds its own Klein app (no module-global app) and reads only
in-memory state of the manager and the libvirt service (summaries from
L{hypervisor.manager.report}): rendering never waits on libvirt, and files (boot logs,
log files) are read on a thread.

Hostile requests and hostile stored values are answered, never left hanging:

 - every response (pages, errors, C{/metrics}, C{/healthz}, static files) carries the
   reference's security headers;
 - pages answer C{GET} and C{HEAD} only (C{405} with C{Allow: GET, HEAD} otherwise)
   and take no request body (C{413});
 - a path or query that is not UTF-8, an unknown query parameter, a number out of
   range or an IP address that does not parse is a C{400} page with a sentence (a
   C{404} for an unknown VM, file or page), logged without a traceback;
 - every handler answers bytes: text is made encodable (lone surrogates, stored before
   values were validated, become U+FFFD), and any failure while rendering is logged
   once with its traceback and becomes a C{500} page that finishes the request.
"""

from __future__ import annotations

import datetime
import errno
import functools
import ipaddress
import json
import math
import os
import re
import socket
import stat
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import jinja2
import markupsafe
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import RequestRedirect

import hypervisor
from hypervisor import codec, flags
from hypervisor.logs import LogBuffer
from hypervisor.manager import report
from hypervisor.manager.manager import Manager
from hypervisor.metrics import Metrics
from hypervisor.model import State
from hypervisor.virt.connection import LibvirtService
from web.headers import SECURITY_HEADERS

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
STATIC = os.path.join(HERE, "static")
BOOTLOG_MAX = 4 * 1024 * 1024
MAX_TAIL = 1_000_000
MAX_WINDOW = 10 * 366 * 86400.0


ALLOWED_METHODS = (b"GET", b"HEAD")
ALLOW = b", ".join(ALLOWED_METHODS)

CONTENT_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
}

HTML = b"text/html; charset=utf-8"
TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"

REASONS = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    413: "request body not accepted",
    500: "error",
    503: "unavailable",
}

_LAST_RESORT = (
    b"<!DOCTYPE html>\n<title>500</title>\n<h1>500: error</h1>\n"
    b"<p>internal error; the log has the details</p>\n"
)
_SURROGATES = re.compile("[\ud800-\udfff]")
_TAIL = re.compile("[0-9]{1,7}", re.ASCII)


def clean_text(text: str) -> str:
    """
    C{text} with every lone surrogate (not encodable in UTF-8; values stored before
    input was validated may hold them) replaced by U+FFFD.
    """
    if text.isascii():  # most text, and a test far cheaper than the search
        return text
    return _SURROGATES.sub("\ufffd", text)


def to_utf8(text: str) -> bytes:
    """
    C{text} as UTF-8, whatever code points it holds (see L{clean_text}).
    """
    return clean_text(text).encode("utf-8")


def _finalize(value: Any) -> Any:
    """
    Jinja2's finalize hook: every value a template prints is made encodable.
    """
    if isinstance(value, markupsafe.Markup):
        return markupsafe.Markup(clean_text(value))
    if isinstance(value, str):
        return clean_text(value)
    return value


def _urlencode(value: Any) -> str:
    """
    Jinja2's C{urlencode} filter for values that may hold lone surrogates.
    """
    text = value if isinstance(value, str) else str(value)
    return urllib.parse.quote(clean_text(text), safe="/")


def _shown(text: str, limit: int = 80) -> str:
    """
    A value from a request as quoted in an error sentence (shortened).
    """
    if len(text) > limit:
        text = text[:limit] + "…"
    return repr(text)


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
    The Jinja2 environment for our templates: autoescaping on, and every printed or
    URL-encoded value made encodable (L{clean_text}). Templates are not checked for
    changes on disk (no C{stat} per page on the reactor thread): L{StatusPages} loads
    them all when it is made.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        auto_reload=False,
    )
    env.filters["duration"] = format_uptime
    env.filters["bytes"] = report.human_bytes
    env.filters["time"] = format_time
    env.filters["mib"] = lambda n: report.human_bytes((n or 0) * 1024 * 1024)
    env.filters["urlencode"] = _urlencode
    return env


class PageError(Exception):
    """
    A page's answer other than 200, decided while handling the request: a status
    (400, 404 ...) and a sentence saying what to do.
    """

    def __init__(self, status: int, message: str, as_json: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.as_json = as_json


def raw_query(request: Request) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """
    The query of the Go pages, percent-decoded but not yet text:
    C{/showVM?10.0.0.2&output=json} -> ([b"10.0.0.2"], [(b"output", b"json")]).
    """
    raw = request.uri.partition(b"?")[2]
    positional: list[bytes] = []
    params: list[tuple[bytes, bytes]] = []
    for part in raw.split(b"&"):
        if not part:
            continue
        key, sep, value = part.partition(b"=")
        key = urllib.parse.unquote_to_bytes(key.replace(b"+", b" "))
        if sep:
            params.append((key, urllib.parse.unquote_to_bytes(value.replace(b"+", b" "))))
        else:
            positional.append(key)
    return positional, params


def split_query(
    request: Request,
    page: str,
    positional: tuple[int, int] = (0, 0),
    names: Sequence[str] = (),
    word: str = "",
    usage: str = "",
    json_errors: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """
    The query of C{page}, checked: UTF-8, between C{positional[0]} and
    C{positional[1]} positional words (each a C{word}), named parameters among
    C{names}, each given once.

    @param usage: an example of a good query, for the error sentences.
    @param json_errors: errors are JSON when the query asks for C{output=json}.
    @raise PageError: (400) for anything else.
    """
    raw_positional, raw_params = raw_query(request)
    as_json = json_errors and (b"output", b"json") in raw_params
    example = f" (example: {usage})" if usage else ""

    def text(value: bytes) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise PageError(
                400,
                f"the query of {page} is not UTF-8; percent-encode " f"UTF-8 text{example}",
                as_json,
            ) from None

    def unknown(key: str) -> PageError:
        takes = ("it takes " + ", ".join(names)) if names else "it takes none"
        return PageError(
            400, f"{page} has no parameter {_shown(key)}; {takes}" f"{example}", as_json
        )

    words = [text(w) for w in raw_positional]
    params: dict[str, str] = {}
    for raw_key, raw_value in raw_params:
        key = text(raw_key)
        if key not in names:
            raise unknown(key)
        if key in params:
            raise PageError(400, f"give {key} once{example}", as_json)
        params[key] = text(raw_value)
    low, high = positional
    if high == 0 and words:
        raise unknown(words[0])
    if not low <= len(words) <= high:
        count = "one" if low == high else f"at most {high}"
        raise PageError(400, f"give {count} {word or 'value'}{example}", as_json)
    return words, params


def parse_ip(text: str, page: str, as_json: bool = False) -> str:
    """
    C{text} as a normalised IP address (the key of C{manager.vms}).

    @raise PageError: (400) if it is not an IP address.
    """
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise PageError(
            400, f"{_shown(text)} is not an IP address; give one: " f"{page}?10.2.3.4", as_json
        ) from None


def parse_tail(text: str) -> int:
    """
    The C{tail=} of the boot log: a number of lines from 1 to L{MAX_TAIL}.

    @raise PageError: (400) otherwise.
    """
    if _TAIL.fullmatch(text) and 1 <= int(text) <= MAX_TAIL:
        return int(text)
    raise PageError(
        400,
        f"tail={_shown(text)} is not a number of lines from 1 to "
        f"{MAX_TAIL} (example: tail=100)",
    )


def parse_window(text: str) -> float:
    """
    The window of C{/logs/showLast}: a duration from 0 to ten years.

    @raise PageError: (400) otherwise.
    """
    try:
        seconds = flags.parse_duration(text)
    except ValueError as e:
        raise PageError(400, f"bad window: {e} (examples: /logs/showLast?1m, ?2h)") from None
    if not math.isfinite(seconds) or seconds > MAX_WINDOW:
        raise PageError(
            400,
            f"window {_shown(text)} is out of range; give at most 10 "
            "years (examples: /logs/showLast?1m, ?2h)",
        )
    return seconds


class NotARegularFile(Exception):
    """
    The name is a symbolic link, directory, FIFO ... not a regular file.
    """


def read_tail_in(directory: str, name: bytes, limit: int) -> Optional[bytes]:
    """
    The last C{limit} bytes of the regular file C{name} directly inside
    C{directory}, or C{None} if there is no such file. Blocking: run on a thread.

    The file is opened relative to the directory with C{O_NOFOLLOW} (a symbolic link
    is refused, never followed) and C{O_NONBLOCK} (a FIFO cannot block the thread),
    and must be a regular file.

    @raise NotARegularFile: C{name} is a link, a directory, a FIFO ...
    """
    if not name or b"/" in name or name in (b".", b".."):
        raise NotARegularFile(name)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
                dir_fd=dir_fd,
            )
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise NotARegularFile(name) from None
            raise
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(name)
        start = max(0, info.st_size - limit)
        chunks = []
        remaining = limit
        while remaining > 0:
            chunk = os.pread(fd, min(remaining, 1 << 20), start)
            if not chunk:
                break
            chunks.append(chunk)
            start += len(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LogFileEntry:
    """
    A regular file of the log directory, as listed on C{/logs}.

    @ivar name: the file's name as stored (any bytes).
    @ivar size: its size in bytes.
    """

    name: bytes
    size: int

    @property
    def shown(self) -> str:
        """
        The name for people (bytes that are not UTF-8 shown as U+FFFD).
        """
        return self.name.decode("utf-8", "replace")

    @property
    def query(self) -> str:
        """
        The name percent-encoded, for C{/logs/file?NAME}.
        """
        return urllib.parse.quote(self.name, safe="")


def list_log_files(directory: str) -> list[LogFileEntry]:
    """
    The regular files directly inside C{directory} (symbolic links and anything else
    left out), sorted by name. Blocking: run on a thread.
    """
    if not directory:
        return []
    encoded = os.fsencode(directory)
    try:
        names = sorted(os.listdir(encoded))
    except OSError:
        return []
    out = []
    for name in names:
        try:
            info = os.lstat(os.path.join(encoded, name))
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            out.append(LogFileEntry(name, info.st_size))
    return out


def _answering(handler: Callable[..., Any]) -> Callable[..., Deferred[bytes]]:
    """
    Wrap a page handler so that it always answers bytes: its result made bytes (with
    C{Content-Length}), a L{PageError} made its page, anything else logged once and
    made a 500 page.
    """

    @functools.wraps(handler)
    def answer(pages: StatusPages, request: Request, *args: Any, **kwargs: Any) -> Deferred[bytes]:
        d: Deferred[Any] = maybeDeferred(handler, pages, request, *args, **kwargs)
        d.addCallback(pages._body, request)
        d.addErrback(pages._failed, request)
        return d

    return answer


class PageApp(Klein):
    """
    A Klein app whose every route goes through L{_answering}: no handler can leave a
    request unfinished, whatever it returns or raises.
    """

    def route(self, url: str, *args: Any, **kwargs: Any) -> Any:
        """
        Like L{Klein.route}, with the handler wrapped.
        """
        register = super().route(url, *args, **kwargs)

        def decorate(handler: Any) -> Any:
            register(_answering(handler))
            return handler

        return decorate


class PagesResource(Resource):
    """
    The resource serving the pages: the checks every request passes before any page
    runs (security headers, method, body, path and Host encoding), then Klein.
    """

    isLeaf = True

    def __init__(self, pages: StatusPages, routes: IResource) -> None:
        super().__init__()
        self.pages = pages
        self.routes = routes

    def render(self, request: Request) -> Any:
        """
        Refuse what no page answers; hand the rest to the routes.
        """
        refusal = self.pages._admit(request)
        if refusal is not None:
            return refusal
        return self.routes.render(request)


class StatusPages:
    """
    The status pages of one daemon.
    """

    app = PageApp()
    log = Logger()

    def __init__(
        self,
        manager: Manager,
        libvirt: LibvirtService,
        hostname: str = "",
        metrics: Optional[Metrics] = None,
        logs: Optional[LogBuffer] = None,
        log_dir: str = "",
        dhcp: Optional[Any] = None,
        tftp: Optional[Any] = None,
        onion: Optional[Any] = None,
    ) -> None:
        self.manager = manager
        self.onion = onion
        self.libvirt = libvirt
        self.dhcp = dhcp
        self.tftp = tftp
        self.hostname = hostname or socket.gethostname()
        self.metrics = metrics or Metrics()
        self.logs = logs or LogBuffer()
        self.log_dir = log_dir
        self._process_refresh: Optional[Deferred[None]] = None
        self.templates = make_environment()
        for name in self.templates.list_templates():
            self.templates.get_template(name)  # read now, before the reactor runs
        self.assets = load_assets()

    def resource(self) -> IResource:
        """
        The Twisted resource serving these pages.
        """
        return PagesResource(self, self.app.resource())

    # helpers -------------------------------------------------------------------

    def _headers(self, request: Request, content_type: bytes) -> None:
        request.setHeader(b"Content-Type", content_type)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)

    def _admit(self, request: Request) -> Optional[bytes]:
        """
        Set the security headers; answer (405, 413, 400) a request no page can serve.

        @return: the refusal's body, or C{None} to go on.
        """
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if request.method not in ALLOWED_METHODS:
            request.setHeader(b"Allow", ALLOW)
            method = request.method.decode("latin-1")
            return self._error_page(
                request, 405, f"the pages answer GET and HEAD only, " f"not {_shown(method, 20)}"
            )
        content = request.content
        if content is not None:
            content.seek(0, os.SEEK_END)
            if content.tell():
                return self._error_page(
                    request, 413, "a page takes no request body; " "send a GET without one"
                )
        try:
            b"/".join((request.prepath or []) + (request.postpath or [])).decode("utf-8")
        except UnicodeDecodeError:
            return self._error_page(
                request,
                400,
                "the path is not UTF-8; "
                "percent-encode UTF-8 text (the status page / "
                "links to every page)",
            )
        try:
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return self._error_page(request, 400, "the Host header is not UTF-8")
        return None

    def _render(self, request: Request, template: str, **context: Any) -> str:
        self._headers(request, HTML)
        m = self.manager
        return self.templates.get_template(template).render(
            hostname=self.hostname,
            version=hypervisor.__version__,
            disabled=m.disabled,
            now=format_time(self.manager.reactor.seconds()),
            **context,
        )

    def _error_page(
        self, request: Request, status: int, message: str, as_json: bool = False
    ) -> bytes:
        """
        An error page (or JSON error) as bytes; never raises.
        """
        request.setResponseCode(status)
        try:
            if as_json:
                self._headers(request, JSON)
                return json.dumps({"Error": clean_text(message)}).encode() + b"\n"
            return to_utf8(
                self._render(
                    request,
                    "error.html",
                    status=status,
                    reason=REASONS.get(status, "error"),
                    message=message,
                )
            )
        except Exception:
            self.log.failure("the error page for {status} failed", status=status)
            self._headers(request, HTML)
            return _LAST_RESORT

    def _body(self, result: Any, request: Request) -> bytes:
        """
        A handler's result as the response body, with its C{Content-Length}.
        """
        if isinstance(result, str):
            body = to_utf8(result)
        elif isinstance(result, bytes):
            body = result
        else:
            raise TypeError(f"a page handler returned {type(result).__name__}")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _failed(self, failure: Failure, request: Request) -> Any:
        """
        A handler's failure as a page: L{PageError} as its status, anything else
        logged once (with the traceback) and a 500. A cancelled request (the client
        went away) is passed on for Klein to drop.
        """
        if failure.check(CancelledError):
            return failure
        error = failure.value
        if isinstance(error, PageError):
            body = self._error_page(request, error.status, error.message, error.as_json)
        else:
            self.log.failure(
                "page {path} failed", failure, path=request.uri.decode("latin-1")[:200]
            )
            body = self._error_page(request, 500, "internal error; the log has the details")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _page_row(self, vm: Any, cpus: int) -> tuple[report.VmRow, str]:
        """
        A VM's /listVMs row and its HTML, kept with the VM until it changes.
        """
        kept = vm.page_row
        if kept is None or kept[2] != cpus:
            row = report.vm_row(vm.info, cpus)
            html = self.templates.get_template("vm_row.html").render(r=row)
            kept = vm.page_row = (row, html, cpus)
        return kept[0], kept[1]

    def _json(self, request: Request, data: Any) -> bytes:
        self._headers(request, JSON)
        return json.dumps(codec.encode_value(data), indent=4).encode() + b"\n"

    # pages -----------------------------------------------------------------------

    @app.route("/", branch=False)
    def index(self, request: Request) -> str:
        """
        The host summary page.
        """
        split_query(request, "/")
        m = self.manager
        infos = [vm.info for vm in m.vms.values()]
        total_mib, available_mib = m.host.memory()
        allocated_mib = sum(i.MemoryInMiB for i in infos)
        cpus = m.host.num_cpus()
        allocated_cpu = sum(i.MilliCPUs for i in infos)
        doms = list(m.domains.values())
        return self._render(
            request,
            "index.html",
            uuid=m.state.uuid,
            start_time=format_time(m.start_time) if m.start_time else "not started",
            uptime=m.uptime,
            libvirt_uri=self.libvirt.uri,
            libvirt_connected=self.libvirt.connected,
            libvirt_state=self.libvirt.describe(),
            libvirt_reconnects=max(0, self.libvirt.connects - 1),
            domains_current=m.domains_current,
            reconciling=m.reconciler.reconciling is not None,
            num_domains=len(doms),
            num_running=sum(1 for d in doms if d.active),
            # another daemon's on the same libvirtd is not managed by this one
            num_ours=sum(1 for d in doms if d.ours and d.hypervisor in ("", m.state.uuid)),
            domain_type=m.domain_type or "not decided yet",
            domain_type_reason=m.domain_type_reason,
            state_dir=m.state.path,
            states=report.states(infos),
            num_vms=len(infos),
            cpus=cpus,
            allocated_cpu=allocated_cpu,
            total_mib=total_mib,
            available_mib=available_mib,
            allocated_mib=allocated_mib,
            pool=report.pool_by_subnet(
                m.pool.free, m.pool.registered, m._addresses_in_use(), m.subnets
            ),
            subnets=m.subnets.list(sort=True),
            volume_directories=report.volume_directories(m.volume_directories, m.host),
            owners=sorted(m.owner_users) + [f"group {g}" for g in sorted(m.owner_groups)],
            tftp=self.tftp.status() if self.tftp is not None else None,
            onion=self.onion.status() if self.onion is not None else None,
        )

    @app.route("/listVMs", branch=False)
    def list_vms(self, request: Request) -> Any:
        """
        The VM table, or its JSON/text forms; filters C{state=} and C{primaryOwner=}.
        """
        _, params = split_query(
            request,
            "/listVMs",
            names=("output", "state", "primaryOwner"),
            usage="/listVMs?state=running&output=json",
            json_errors=True,
        )
        output = params.get("output", "html")
        state = params.get("state", "")
        if state and state not in {s.value for s in State}:
            raise PageError(
                400,
                f"unknown state {_shown(state)}; states are: " + ", ".join(s.value for s in State),
                output == "json",
            )
        if output not in ("html", "json", "text"):
            raise PageError(400, f"unknown output {_shown(output)}; use html, json or " "text")
        m = self.manager
        primary_owner = params.get("primaryOwner", "")
        vms = sorted(
            (
                vm
                for vm in m.vms.values()
                if (not state or vm.info.State.value == state)
                and (not primary_owner or vm.info.primary_owner == primary_owner)
            ),
            key=lambda vm: vm.sort_key,
        )
        if output == "json":
            self._headers(request, JSON)
            return b"[" + b",\n".join(vm.encoded_info() for vm in vms) + b"]\n"
        if output == "text":
            self._headers(request, TEXT)
            return "".join(f"{vm.ip}\n" for vm in vms)
        cpus = m.host.num_cpus()
        kept = [self._page_row(vm, cpus) for vm in vms]
        rows = [row for row, _ in kept]
        total, owners = report.totals(rows)
        total_mib, _ = m.host.memory()
        capacity_storage = sum(
            v.Size for v in report.volume_directories(m.volume_directories, m.host)
        )
        return self._render(
            request,
            "list_vms.html",
            rows_html=markupsafe.Markup("".join(html for _, html in kept)),
            total=total,
            owners=owners,
            state=state,
            primary_owner=params.get("primaryOwner", ""),
            states=[s.value for s in State],
            capacity={
                "memory_mib": total_mib,
                "milli_cpus": m.host.num_cpus() * 1000,
                "vcpus": m.host.num_cpus(),
                "storage": capacity_storage,
            },
        )

    @app.route("/showVM", branch=False)
    async def show_vm(self, request: Request) -> Any:
        """
        One VM in full; C{&output=json} for its VmInfo.
        """
        positional, params = split_query(
            request,
            "/showVM",
            positional=(1, 1),
            names=("output",),
            word="IP address",
            usage="/showVM?10.2.3.4&output=json",
            json_errors=True,
        )
        output = params.get("output", "html")
        as_json = output == "json"
        if output not in ("html", "json"):
            raise PageError(400, f"unknown output {_shown(output)}; use html or json")
        ip = parse_ip(positional[0], "/showVM", as_json)
        vm = self.manager.vms.get(ip)
        if vm is None or vm.deleted:
            raise PageError(404, f"no VM with IP {ip}", as_json)
        if as_json:
            return self._json(request, vm.info)
        info = vm.info
        volumes = [
            {
                "index": i,
                "volume": v,
                "file": (
                    vm.local.VolumeLocations[i].Filename
                    if i < len(vm.local.VolumeLocations)
                    else ""
                ),
            }
            for i, v in enumerate(info.Volumes)
        ]
        has_bootlog = await deferToThread(os.path.exists, os.path.join(vm.directory, "bootlog"))
        return self._render(
            request,
            "show_vm.html",
            info=info,
            volumes=volumes,
            row=report.vm_row(info, self.manager.host.num_cpus()),
            info_json=json.dumps(codec.encode_value(info), indent=4),
            has_bootlog=has_bootlog,
        )

    @app.route("/showVmBootLog", branch=False)
    async def show_boot_log(self, request: Request) -> Any:
        """
        The VM's serial output as text (CRLF -> LF); C{&tail=N} for the last N lines.
        """
        positional, params = split_query(
            request,
            "/showVmBootLog",
            positional=(1, 1),
            names=("tail",),
            word="IP address",
            usage="/showVmBootLog?10.2.3.4&tail=100",
        )
        ip = parse_ip(positional[0], "/showVmBootLog")
        tail = parse_tail(params["tail"]) if "tail" in params else 0
        vm = self.manager.vms.get(ip)
        if vm is None or vm.deleted:
            raise PageError(404, f"no VM with IP {ip}")
        try:
            data = await deferToThread(read_tail_in, vm.directory, b"bootlog", BOOTLOG_MAX)
        except NotARegularFile:
            raise PageError(404, f"the boot log of {ip} is not a regular file") from None
        text = (data or b"").decode("utf-8", "replace").replace("\r\n", "\n")
        if tail:
            text = "\n".join(text.splitlines()[-tail:]) + "\n"
        self._headers(request, TEXT)
        return text

    @app.route("/listSubnets", branch=False)
    def list_subnets(self, request: Request) -> bytes:
        """
        Subnets as JSON.
        """
        split_query(request, "/listSubnets")
        return self._json(request, self.manager.subnets.list(sort=True))

    @app.route("/listAvailableAddresses", branch=False)
    def list_available(self, request: Request) -> bytes:
        """
        Free addresses as JSON.
        """
        split_query(request, "/listAvailableAddresses")
        return self._json(request, self.manager.pool.free)

    @app.route("/listRegisteredAddresses", branch=False)
    def list_registered(self, request: Request) -> bytes:
        """
        Registered addresses as JSON.
        """
        split_query(request, "/listRegisteredAddresses")
        return self._json(request, self.manager.pool.registered)

    @app.route("/listVolumeDirectories", branch=False)
    def list_volume_directories(self, request: Request) -> str:
        """
        Volume directories, one per line.
        """
        split_query(request, "/listVolumeDirectories")
        self._headers(request, TEXT)
        return "".join(f"{d}\n" for d in self.manager.volume_directories)

    @app.route("/showVolumeDirectories", branch=False)
    def show_volume_directories(self, request: Request) -> bytes:
        """
        Volume directories with mount point and space, as JSON.
        """
        split_query(request, "/showVolumeDirectories")
        return self._json(
            request,
            [
                {
                    "Directory": d.Directory,
                    "CanTrim": d.CanTrim,
                    "MountPoint": d.MountPoint,
                    "Size": d.Size,
                    "Available": d.Available,
                }
                for d in report.volume_directories(
                    self.manager.volume_directories, self.manager.host
                )
            ],
        )

    @app.route("/showDhcpStatus", branch=False)
    def show_dhcp_status(self, request: Request) -> str:
        """
        The DHCP server's interfaces and leases: static (VMs), external, netboot and
        dynamic, with expiry times (from memory).
        """
        split_query(request, "/showDhcpStatus")
        if self.dhcp is not None:
            return self._render(request, "dhcp.html", dhcp_running=True, **self.dhcp.status())
        static = [
            {
                "mac": lease.MacAddress,
                "ip": lease.IpAddress,
                "hostname": lease.Hostname,
                "subnet": lease.Subnet.Id if lease.Subnet is not None else "",
                "vm": lease.vm_ip,
            }
            for lease in self.manager.leases()
        ]
        return self._render(
            request,
            "dhcp.html",
            dhcp_running=False,
            interfaces=[],
            notes=[],
            static=static,
            external=[],
            netboot=[],
            dynamic=[],
            bridges_only=False,
        )

    @app.route("/logs", branch=False)
    async def logs_page(self, request: Request) -> str:
        """
        The latest log lines and the log files.
        """
        split_query(request, "/logs")
        files = await deferToThread(list_log_files, self.log_dir)
        return self._render(
            request,
            "logs.html",
            lines=list(self.logs.lines)[-500:],
            files=files,
            window="",
            total=len(self.logs.lines),
        )

    @app.route("/logs/showLast", branch=False)
    async def logs_last(self, request: Request) -> str:
        """
        The lines of the last window (C{?1m}, C{?30s}, C{?2h}).
        """
        positional, _ = split_query(
            request, "/logs/showLast", positional=(0, 1), word="window", usage="/logs/showLast?1m"
        )
        window = positional[0] if positional else "1m"
        seconds = parse_window(window)
        lines = self.logs.since(self.manager.reactor.seconds() - seconds)
        files = await deferToThread(list_log_files, self.log_dir)
        return self._render(
            request,
            "logs.html",
            lines=lines,
            files=files,
            window=window,
            total=len(self.logs.lines),
        )

    @app.route("/logs/dump", branch=False)
    def logs_dump(self, request: Request) -> str:
        """
        Every remembered line, as text.
        """
        split_query(request, "/logs/dump")
        self._headers(request, TEXT)
        return "".join(
            f"{format_time(line.time)} [{line.level}] {line.namespace}: " f"{line.text}\n"
            for line in self.logs.lines
        )

    @app.route("/logs/file", branch=False)
    async def logs_file(self, request: Request) -> Any:
        """
        A regular file directly inside C{-logDir} (by name, from the listing only), as
        text; symbolic links are never followed.
        """
        positional, params = raw_query(request)
        missing = PageError(404, "no such log file; /logs lists them")
        if len(positional) != 1 or params:
            raise missing
        name = positional[0]
        files = await deferToThread(list_log_files, self.log_dir)
        if name not in {entry.name for entry in files}:
            raise missing
        try:
            data = await deferToThread(read_tail_in, self.log_dir, name, BOOTLOG_MAX)
        except NotARegularFile:
            raise missing from None
        if data is None:
            raise missing
        self._headers(request, TEXT)
        return data.decode("utf-8", "replace")

    @app.route("/metrics", branch=False)
    def metrics_page(self, request: Request) -> bytes:
        """
        Prometheus metrics (text format): ours from memory; the process figures
        (C{/proc}) as last read on a thread, read again after each scrape.
        """
        split_query(request, "/metrics")
        request.setHeader(b"Content-Type", self.metrics.content_type.encode())
        body = self.metrics.own_text() + self.metrics.process_figures
        if self._process_refresh is None:

            def done(_: object) -> None:
                self._process_refresh = None

            d = deferToThread(self.metrics.refresh_process_figures)
            d.addErrback(lambda f: self.log.failure("reading the process figures", f))
            self._process_refresh = d
            d.addBoth(done)
        return body

    @app.route("/healthz", branch=False)
    def healthz(self, request: Request) -> bytes:
        """
        C{200 ok} when libvirt is connected, else 503 with the reason.
        """
        split_query(request, "/healthz")
        self._headers(request, TEXT)
        if self.libvirt.connected:
            return b"ok\n"
        request.setResponseCode(503)
        return to_utf8(self.libvirt.describe() + "\n")

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
    def unexpected(self, request: Request, failure: Failure) -> bytes:
        """
        A request no route matched (404), or anything unexpected before a page ran
        (logged once, a 500 page without the traceback). Never raises.
        """
        if failure.check(RouteNotFound, RequestRedirect):
            path = request.path.decode("utf-8", "replace")
            body = self._error_page(
                request, 404, f"no page at {_shown(path)}; the " "status page / links to every page"
            )
        elif (
            failure.check(HTTPException)
            and isinstance(failure.value, HTTPException)
            and failure.value.code
            and failure.value.code < 500
        ):
            error = failure.value
            assert error.code is not None
            body = self._error_page(request, error.code, str(error.name))
        else:
            self.log.failure(
                "page {path} failed", failure, path=request.uri.decode("latin-1")[:200]
            )
            body = self._error_page(request, 500, "internal error; the log has the " "details")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body
