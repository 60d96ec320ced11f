# -*- test-case-name: tests.test_web_status -*-
"""
The status pages on port 6976: C{/} (host summary) and C{/healthz}.

A L{StatusPages} object holds its own Klein app (no module-global app) and reads only
in-memory state of the manager and the libvirt service: rendering never waits on
libvirt.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Optional

import jinja2
from klein import Klein
from twisted.web.iweb import IRequest

import hypervisor
from hypervisor.manager.manager import Manager
from hypervisor.metrics import Metrics
from hypervisor.virt.connection import LibvirtService

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
STATIC = os.path.join(HERE, "static")

SECURITY_HEADERS = {
    b"X-Frame-Options": b"DENY",
    b"X-XSS-Protection": b"1",
    b"Content-Security-Policy": b"default-src 'self' ;style-src 'self' 'unsafe-inline'",
    b"X-Content-Type-Options": b"nosniff",
}


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
    return env


CONTENT_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript",
                 ".png": b"image/png", ".svg": b"image/svg+xml"}


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


class StatusPages:
    """
    The status pages of one daemon.
    """

    app = Klein()

    def __init__(
        self, manager: Manager, libvirt: LibvirtService, hostname: str = "",
        metrics: Optional[Metrics] = None,
    ) -> None:
        self.manager = manager
        self.libvirt = libvirt
        self.metrics = metrics or Metrics()
        self.hostname = hostname or socket.gethostname()
        self.templates = make_environment()
        self.assets = load_assets()

    def resource(self) -> Any:
        """
        The Twisted resource serving these pages.
        """
        return self.app.resource()

    def _headers(self, request: IRequest, content_type: bytes) -> None:
        request.setHeader(b"Content-Type", content_type)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)

    @app.route("/", branch=False)
    def index(self, request: IRequest) -> str:
        """
        The host summary page.
        """
        self._headers(request, b"text/html; charset=utf-8")
        m = self.manager
        start = (
            datetime.datetime.fromtimestamp(m.start_time, datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M:%S UTC")
            if m.start_time is not None else "not started"
        )
        doms = list(m.domains.values())
        return self.templates.get_template("index.html").render(
            hostname=self.hostname,
            version=getattr(hypervisor, "__version__", ""),
            uuid=m.state.uuid,
            start_time=start,
            uptime=m.uptime,
            disabled=m.disabled,
            libvirt_uri=self.libvirt.uri,
            libvirt_connected=self.libvirt.connected,
            libvirt_state=self.libvirt.describe(),
            domains_current=m.domains_current,
            num_domains=len(doms),
            num_running=sum(1 for d in doms if d.active),
            num_ours=sum(1 for d in doms if d.ours),
            domain_type=m.domain_type or "not decided yet",
            domain_type_reason=m.domain_type_reason,
            state_dir=m.state.path,
        )

    @app.route("/healthz", branch=False)
    def healthz(self, request: IRequest) -> bytes:
        """
        C{200 ok} when libvirt is connected, else 503 with the reason.
        """
        self._headers(request, b"text/plain; charset=utf-8")
        if self.libvirt.connected:
            return b"ok\n"
        request.setResponseCode(503)
        return (self.libvirt.describe() + "\n").encode("utf-8")

    @app.route("/metrics", branch=False)
    def metrics_page(self, request: IRequest) -> bytes:
        """
        Prometheus metrics (text format).
        """
        request.setHeader(b"Content-Type", self.metrics.content_type.encode())
        return self.metrics.text()

    @app.route("/static/<name>", branch=False)
    def static(self, request: IRequest, name: str) -> bytes:
        """
        Our CSS and other assets, from memory (no external assets: hosts may have no
        internet).
        """
        asset = self.assets.get(name)
        if asset is None:
            request.setResponseCode(404)
            self._headers(request, b"text/plain; charset=utf-8")
            return b"no such file\n"
        content_type, body = asset
        self._headers(request, content_type)
        request.setHeader(b"Cache-Control", b"max-age=3600")
        return body
