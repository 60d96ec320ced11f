# -*- test-case-name: tests.test_tap -*-
"""
The daemon's service tree: L{makeService} builds a C{MultiService} of named children,
each from a small factory so a test can build one alone.

Children, in start order (stop runs in reverse): C{logging}, C{libvirt}, C{manager},
C{dhcp}, C{tftp}, C{web}, C{pb}, C{onion} (with C{-pbOnion}), C{metadata}, C{control}.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.application import internet, service
from twisted.logger import Logger

from hypervisor.auth import TrustStore
from hypervisor.control import ControlFactory, DaemonControl
from hypervisor.logs import LogBuffer, LogFileService
from hypervisor.manager.acks import DhcpAcknowledgements
from hypervisor.manager.manager import Manager
from hypervisor.metrics import Metrics
from hypervisor.model import CloudInitDatasource
from hypervisor.store import StateDirectory
from hypervisor.virt.connection import LibvirtService
from tap.options import Options

log = Logger()


def _make_logging_service(options: Options, buffer: LogBuffer) -> service.IService:
    return LogFileService(
        options["logDir"],
        buffer=buffer,
        rotate_length=options["logFileMaxSize"],
        quota=options["logQuota"],
        log_at_startup=options["logAtStartup"],
        mark_after=options["idleMarkTimeout"],
    )


def _make_libvirt_service(options: Options, reactor: Any) -> LibvirtService:
    return LibvirtService(options["libvirtUri"], reactor)


def _make_manager_service(
    options: Options,
    libvirt: LibvirtService,
    reactor: Any,
    acks: Optional[DhcpAcknowledgements] = None,
) -> Manager:
    """
    The manager, given the DHCP acknowledgement seam the DHCP service reports to.
    """
    return Manager(
        StateDirectory(options["stateDir"]),
        libvirt,
        reactor,
        domain_type=options["domainType"],
        vm_shutdown_timeout=options["vmShutdownTimeout"],
        volume_directories=options["volumeDirectories"] or None,
        images_directory=options["localImagesDirectory"],
        datasource=CloudInitDatasource(options["cloudInitDatasource"]),
        acks=acks,
        **_image_options(options),
    )


def _image_options(options: Options) -> dict[str, Any]:
    """
    The manager's image cache and download settings from the flags.
    """
    from hypervisor.manager.manager import detect_volume_directories

    directory = options["objectCacheDirectory"]
    if not directory:
        first = (options["volumeDirectories"] or detect_volume_directories())[0]
        directory = os.path.join(os.path.dirname(first.rstrip("/")), "objectcache")
    policy = None
    if options["imageCAfile"]:
        from hypervisor.manager.fetch import tls_policy_from_ca_file

        policy = tls_policy_from_ca_file(options["imageCAfile"])
    image_server = None
    try:
        from hypervisor.imageserver import ImageServerClientPolicy

        image_server = (
            options["imageServerHostname"],
            options["imageServerPortNum"],
            ImageServerClientPolicy(options["certFile"], options["keyFile"], options["CAfile"]),
        )
    except (OSError, ValueError) as e:
        log.info("no image server for ImageName (needs -certFile, -keyFile, -CAfile): {e}", e=e)
    return dict(
        image_server=image_server,
        image_cache_directory=directory,
        image_cache_size=options["objectCacheSize"],
        image_timeout=options["imageTimeout"],
        image_max_size=options["imageMaxSize"],
        image_tls_policy=policy,
    )


def _tls_options(options: Options, trust: TrustStore) -> Optional[Any]:
    """
    The server TLS options, or None (with a warning saying why) when HTTPS is off.
    """
    from hypervisor.tls import server_tls_options

    if trust.empty:
        log.warn(
            "neither {ca} nor {ica} holds a certificate: RPC over HTTPS is refused "
            "(create them with 'hypervisor make-certs')",
            ca=options["CAfile"],
            ica=options["identityCAfile"],
        )
    try:
        return server_tls_options(options["certFile"], options["keyFile"], trust)
    except (OSError, ValueError) as e:
        log.warn(
            "no usable server certificate ({why}): HTTPS is off, port {port} "
            "serves plain HTTP only (create one with 'hypervisor make-certs')",
            why=e,
            port=options["portNum"],
        )
        return None


def _make_dhcp_service(
    options: Options,
    manager: Manager,
    acks: DhcpAcknowledgements,
    reactor: Any,
    metrics: Optional[Metrics] = None,
) -> Any:
    """
    The DHCP server: leases from C{manager}, every ACK reported to C{acks} (the seam
    the manager's DhcpTimeout waits use), dynamic leases in the state directory.
    """
    from hypervisor.dhcp.policy import DhcpPolicy
    from hypervisor.dhcp.protocol import DhcpServer
    from hypervisor.dhcp.service import DhcpService
    from hypervisor.dhcp.watch import PacketWatchers

    policy = DhcpPolicy(
        manager,
        reactor,
        writer=manager.writer,
        leases_path=manager.state.join("dynamic-leases.json"),
        acks=acks,
        network_boot_image=options["networkBootImage"],
        metadata_route=options["dhcpMetadataRoute"],
        reserved=lambda: [address.IpAddress for address in manager.pool.registered],
    )
    watchers = PacketWatchers()
    server = DhcpServer(
        policy, stats=metrics.dhcp if metrics is not None else None, watchers=watchers
    )
    return DhcpService(
        server,
        reactor,
        runner=manager.runner,
        acks=acks,
        bridges_only=options["dhcpServerOnBridgesOnly"],
        watchers=watchers,
    )


def _make_tftp_service(
    options: Options, dhcp: Any, reactor: Any, metrics: Optional[Metrics] = None
) -> Any:
    """
    The TFTP server: a client's NetbootMachine files (kept by the DHCP server's
    policy), then C{-tftpbootDirectory}; UDP C{-tftpPortNum}, bound as root.
    """
    from hypervisor.tftp.service import TftpService

    return TftpService(
        reactor,
        files_for=dhcp.policy.netboot_files,
        directory=options["tftpbootDirectory"],
        port=options["tftpPortNum"],
        stats=metrics.tftp if metrics is not None else None,
        max_blksize=options["tftpMaxBlockSize"],
        transfer_threads=options["tftpTransferThreads"],
        spin_microseconds=options["tftpSpinMicroseconds"],
        enabled=options["tftpPortNum"] != 0,
    )


def _make_dispatcher(
    options: Options,
    manager: Manager,
    reactor: Any,
    metrics: Metrics,
    dhcp: Optional[Any] = None,
    metadata: Optional[Any] = None,
) -> Any:
    """
    The one dispatcher every RPC transport uses (C{metadata}: the metadata server's
    backend, for TraceVmMetadata).
    """
    from hypervisor.api import HypervisorApi
    from hypervisor.dispatch import Dispatcher

    api = HypervisorApi(manager, dhcp, metadata)
    # Migrations and copies call the other hypervisor with this daemon's own
    # certificate; the source checks its outgoing migrations once running.
    migrations = api.migrations
    if options["certFile"] and options["keyFile"]:
        migrations.credentials = (options["certFile"], options["keyFile"])
    migrations.port = options["portNum"]
    reactor.callWhenRunning(migrations.start)
    reactor.addSystemEventTrigger("before", "shutdown", migrations.stop)
    return Dispatcher(
        api,
        metrics,
        reactor,
        allow_unauthenticated_reads=options["allowUnauthenticatedReads"],
    )


def _make_web_service(
    options: Options,
    manager: Manager,
    libvirt: LibvirtService,
    reactor: Any,
    metrics: Optional[Metrics] = None,
    logs: Optional[LogBuffer] = None,
    dispatcher: Optional[Any] = None,
    trust: Optional[TrustStore] = None,
    dhcp: Optional[Any] = None,
    tftp: Optional[Any] = None,
    tls: Optional[Any] = None,
    onion: Optional[Any] = None,
) -> Any:
    from hypervisor.netguard import guard_factory
    from hypervisor.srpc.protocol import SrpcFactory
    from hypervisor.tls import SniffingFactory
    from web.channel import HypervisorChannel
    from web.root import HypervisorSite, make_root
    from web.rpc import RpcEndpoints, request_factory
    from web.srpc_routes import SrpcRoutes

    metrics = metrics or Metrics()
    metrics.watch_manager(manager)
    if trust is None:
        trust = TrustStore.from_files(options["CAfile"], options["identityCAfile"])
    if dispatcher is None:
        dispatcher = _make_dispatcher(options, manager, reactor, metrics, dhcp)

    def pages() -> Any:
        # Imported and built on the first page request (LazyPages): start-up and
        # RPC do not wait for Klein, Jinja2 and the templates.
        from web.status import StatusPages

        return StatusPages(
            manager,
            libvirt,
            metrics=metrics,
            logs=logs,
            log_dir=options["logDir"],
            dhcp=dhcp,
            tftp=tftp,
            onion=onion,
        )

    from web.console import routes as console_routes

    extra = {b"_goSRPC_": SrpcRoutes(), **console_routes(manager, dispatcher, trust)}
    site = HypervisorSite(make_root(pages, RpcEndpoints(), extra))
    site.requestFactory = request_factory(dispatcher, trust)
    site.protocol = HypervisorChannel  # type: ignore[method-assign,assignment]
    site.displayTracebacks = False
    # tls: the daemon's ReloadableTLS (certificate rotation), shared with the pb service.
    tls_options = (
        (tls if tls.available else None) if tls is not None else _tls_options(options, trust)
    )
    # SRPC (CONNECT /_SRPC_/TLS/JSON) on the same port, over the same dispatcher.
    srpc = SrpcFactory(dispatcher, trust, tls_options, reactor, metrics)
    factory = guard_factory(SniffingFactory(site, tls_options, connect=srpc.router), reactor)
    return factory.tcp_server(options["portNum"])


def _make_metadata_backend(manager: Manager, reactor: Any) -> Any:
    """
    The metadata server's decisions (identity, path trees, traces), shared by the
    C{metadata} service and the dispatcher (TraceVmMetadata).
    """
    from hypervisor.metadata.backend import MetadataBackend

    return MetadataBackend(
        manager, reactor, manager.runner, hypervisor_uuid=lambda: manager.state.uuid
    )


def _make_metadata_service(
    options: Options,
    manager: Manager,
    reactor: Any,
    metrics: Optional[Metrics] = None,
    web: Optional[Any] = None,
    backend: Optional[Any] = None,
) -> Any:
    """
    The metadata server: per bridge a namespace holding 169.254.169.254, serving the
    path tree on port 80 and (given the C{web} service) the web port's factory on
    C{portNum} there too; C{backend} from L{_make_metadata_backend} (made if not given).
    """
    from hypervisor.metadata.resource import MetadataMetrics
    from hypervisor.metadata.service import MetadataService

    if backend is None:
        backend = _make_metadata_backend(manager, reactor)
    extra = []
    if web is not None and getattr(web, "args", None):
        extra.append((options["portNum"], web.args[1]))
    return MetadataService(
        backend,
        reactor,
        runner=manager.runner,
        tag=lambda: manager.state.uuid,
        metrics=MetadataMetrics(metrics.registry) if metrics is not None else None,
        extra=extra,
        enabled=options["metadataServer"],
    )


def _make_pb_service(
    options: Options, manager: Manager, dispatcher: Any, tls: Any, reactor: Any
) -> service.IService:
    """
    The Perspective Broker admin service on C{-pbPortNum} (L{hypervisor.pb.server}),
    with the runtime admin surface (L{hypervisor.pb.admin}).
    """
    from hypervisor.pb.admin import AdminSurface
    from hypervisor.pb.server import PbService

    return PbService(
        dispatcher, tls, reactor, options["pbPortNum"], admin=AdminSurface(manager, tls)
    )


def _make_control_service(options: Options, manager: Manager, reactor: Any) -> internet.UNIXServer:
    return internet.UNIXServer(
        manager.state.control_path,
        ControlFactory(DaemonControl(manager, reactor)),
        mode=0o600,
        wantPID=False,
        reactor=reactor,
    )


def makeService(options: Options, reactor: Optional[Any] = None) -> service.MultiService:
    """
    Build the daemon's service tree from parsed L{Options}.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from hypervisor.netguard import raise_nofile_limit

    raise_nofile_limit()
    top = service.MultiService()
    named: list[tuple[str, service.IService]] = []
    logs = LogBuffer(options["logbufLines"])
    named.append(("logging", _make_logging_service(options, logs)))
    libvirt = _make_libvirt_service(options, reactor)
    named.append(("libvirt", libvirt))
    # One seam between the DHCP server (when it runs) and the manager's DhcpTimeout waits.
    acks = DhcpAcknowledgements(reactor)
    manager = _make_manager_service(options, libvirt, reactor, acks)
    named.append(("manager", manager))
    metrics = Metrics()
    dhcp = _make_dhcp_service(options, manager, acks, reactor, metrics)
    named.append(("dhcp", dhcp))
    tftp = _make_tftp_service(options, dhcp, reactor, metrics)
    named.append(("tftp", tftp))
    trust = TrustStore.from_files(options["CAfile"], options["identityCAfile"])
    metadata = _make_metadata_backend(manager, reactor)
    dispatcher = _make_dispatcher(
        options,
        manager,
        reactor,
        metrics,
        dhcp,
        metadata if options["metadataServer"] else None,
    )
    from hypervisor.tlsreload import ReloadableTLS

    tls = ReloadableTLS(
        options["certFile"],
        options["keyFile"],
        options["CAfile"],
        options["identityCAfile"],
        trust,
        _tls_options(options, trust),
    )
    onion = None
    if options["pbOnion"]:
        # -pbOnion: the pb service also published as a Tor onion service (made before
        # the web service, whose status page shows it; it finds pb when it starts).
        from hypervisor.onion import make_onion_service

        onion = make_onion_service(
            options, lambda: top.getServiceNamed("pb"), manager.runner, reactor
        )
    web = _make_web_service(
        options,
        manager,
        libvirt,
        reactor,
        metrics=metrics,
        logs=logs,
        dispatcher=dispatcher,
        trust=trust,
        dhcp=dhcp,
        tftp=tftp,
        tls=tls,
        onion=onion,
    )
    named.append(("web", web))
    named.append(("pb", _make_pb_service(options, manager, dispatcher, tls, reactor)))
    if onion is not None:
        named.append(("onion", onion))
    named.append(
        ("metadata", _make_metadata_service(options, manager, reactor, metrics, web, metadata))
    )
    named.append(("control", _make_control_service(options, manager, reactor)))
    for name, child in named:
        child.setName(name)
        child.setServiceParent(top)
    from hypervisor.gctune import settle_when_running

    settle_when_running(reactor)
    return top
