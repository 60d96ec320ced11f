# -*- test-case-name: tests.test_onion,tests.test_onion_network -*-
"""
The Perspective Broker service published as a Tor onion service (C{-pbOnion}).

Tor gives reachability without opening a port: the hypervisor can be administered
from anywhere Tor reaches, while nothing listens on a public address. Client
certificates still decide access: an onion connection is PB over TLS exactly as on
C{-pbPortNum}, verified by the same code (L{hypervisor.pb.server.make_pb_factory}).

How it works:

- The daemon listens for the onion service on C{127.0.0.1} on a port the kernel picks
  (its sessions show as transport C{pb-onion}); C{-pbPortNum} may be 0, so that PB
  is reachable over Tor only. The tor must run on the same host (in the same
  network namespace): it forwards the onion's port to that loopback address.
- Which tor: C{-torControl} (a Twisted client endpoint string such as
  C{unix:/run/tor/control} or C{tcp:127.0.0.1:9051}) names the control port of a tor
  the operator runs (Debian's C{tor} package: C{ControlPort /run/tor/control} or
  C{9051} with C{CookieAuthentication 1}; the daemon must be able to read the
  cookie). Without C{-torControl}, the daemon launches its own tor (Debian's
  C{tor} from C{PATH}; DataDirectory C{<stateDir>/tor}, a control socket in it,
  cookie authentication, no SOCKS port) and drives it with txtorcon; that tor
  needs to reach the Tor network, and exits with the daemon (C{TAKEOWNERSHIP} and
  C{__OwningControllerProcess}). It is started as C{txtorcon.launch} would, except
  that the daemon does not wait for tor to bootstrap (C{launch} waits for 100 %,
  forever when tor cannot reach the network): the service is added at once and tor
  publishes it once it has bootstrapped; the status page shows tor's progress.
  C{-torConfigFile} names a torrc that launched tor includes (bridges, a proxy).
- The service is an I{ephemeral} onion service (C{ADD_ONION}) whose key the daemon
  makes itself and keeps in C{<stateDir>/onion/pb.json} (mode 0600; its directory
  0700), so the address is known before tor is reached and stays the same across
  restarts and tor restarts. Tor removes the service when the control connection
  closes (the daemon stops or dies); a new connection adds it again.
- The onion's port is C{-pbPortNum} (8787 when that is 0): clients connect to
  C{tor:<address>.onion:8787}.
- Failure to reach tor (not running, wrong endpoint, cookie not readable) is logged
  as an error with the reason and shown on the status page; the daemon keeps
  serving every other endpoint and tries again (5 s, doubling up to 5 minutes), as
  it does when the connection to tor is lost later. An operator asking for
  C{-pbOnion} gets the daemon either way; the status page and the log say whether
  the onion service is up.

All tor I/O is txtorcon on the reactor; the key file is read and written on the
disk thread pool (L{hypervisor.diskio}).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

# Imported with this module (at start-up, when -pbOnion makes the service): txtorcon
# looks for tor's GeoIP file as it is imported, which must not happen on the reactor.
import txtorcon
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.application import service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hypervisor import store
from hypervisor.diskio import IBlockingRunner

log = Logger()

KEY_TYPE = "ED25519-V3"
ONION_DIRECTORY = "onion"
DEFAULT_ONION_PORT = 8787
RETRY_FIRST = 5.0
RETRY_MAX = 300.0
STOP_TIMEOUT = 5.0
LAUNCH_TIMEOUT = 30.0
LAST_LINES = 20


class OnionKeyError(Exception):
    """
    The key file exists but cannot be used (its sentence says what to do).
    """


@dataclass(frozen=True)
class OnionKey:
    """
    An onion service's key as tor's C{ADD_ONION} takes it (C{ED25519-V3:<base64 of the
    64-byte expanded secret key>}) and the address it gives.
    """

    blob: str
    address: str


def onion_address(public_key: bytes) -> str:
    """
    The v3 onion address of an ed25519 public key (rend-spec-v3, section 6):
    base32(key | checksum | version), checksum = SHA3-256(".onion checksum" | key |
    version)[:2], version 3.
    """
    if len(public_key) != 32:
        raise ValueError("an ed25519 public key has 32 bytes")
    version = b"\x03"
    checksum = hashlib.sha3_256(b".onion checksum" + public_key + version).digest()[:2]
    return base64.b32encode(public_key + checksum + version).decode("ascii").lower() + ".onion"


def valid_onion_address(address: str) -> bool:
    """
    Whether C{address} is a well-formed v3 onion address (checksum and version).
    """
    name = address.lower().removesuffix(".onion")
    if len(name) != 56:
        return False
    try:
        raw = base64.b32decode(name.upper())
    except ValueError:
        return False
    return onion_address(raw[:32]) == name + ".onion"


def new_key() -> OnionKey:
    """
    A new random key: an ed25519 seed, expanded as tor keeps it (SHA-512 of the seed,
    the scalar half clamped).
    """
    seed = os.urandom(32)
    public = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    expanded = bytearray(hashlib.sha512(seed).digest())
    expanded[0] &= 248
    expanded[31] &= 127
    expanded[31] |= 64
    blob = f"{KEY_TYPE}:{base64.b64encode(bytes(expanded)).decode('ascii')}"
    return OnionKey(blob, onion_address(public))


def _check(key: Any, path: str) -> OnionKey:
    if not isinstance(key, dict):
        raise OnionKeyError(f"{path} is not a JSON object; move it away to make a new key")
    blob, address = key.get("Key"), key.get("Address")
    if not isinstance(blob, str) or not blob.startswith(KEY_TYPE + ":"):
        raise OnionKeyError(f"{path}: Key is not {KEY_TYPE}:<base64>")
    try:
        raw = base64.b64decode(blob.split(":", 1)[1], validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 64:
        raise OnionKeyError(f"{path}: Key is not 64 bytes of base64")
    if not isinstance(address, str) or not valid_onion_address(address):
        raise OnionKeyError(f"{path}: Address is not a v3 onion address")
    return OnionKey(blob, address)


def load_or_create_key(directory: str, name: str = "pb") -> tuple[OnionKey, bool]:
    """
    The key in C{directory/<name>.json}, made (and written, mode 0600, the directory
    0700) if there is none. Blocking: run it on the disk thread pool.

    @return: the key and whether it was made now.
    @raise OnionKeyError: the file exists but is not a key of ours.
    @raise OSError: it cannot be read or written.
    """
    path = os.path.join(directory, f"{name}.json")
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024)
    except FileNotFoundError:
        pass
    else:
        try:
            parsed = json.loads(data)
        except ValueError:
            raise OnionKeyError(
                f"{path} is not JSON; move it away to make a new key (a new address)"
            ) from None
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
        return _check(parsed, path), False
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    key = new_key()
    body = json.dumps({"Key": key.blob, "Address": key.address}, indent=2) + "\n"
    store.atomic_write(path, body.encode("ascii"), mode=0o600)
    return key, True


def state_key(state_dir: str) -> OnionKey:
    """
    The PB onion key of the daemon whose state directory is C{state_dir} (made if
    missing): for C{hypervisor onion-address} and C{hypervisor -pbOnion make-certs}.
    """
    return load_or_create_key(os.path.join(state_dir, ONION_DIRECTORY))[0]


def certificate_lacks_onion(cert_file: str, state_dir: str) -> str:
    """
    A sentence if the daemon's certificate does not name its onion address (clients
    over Tor verify it for that name), else "".
    """
    from cryptography import x509

    address = state_key(state_dir).address
    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = names.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if address in dns:
        return ""
    return (
        f"{cert_file} does not name {address}: hyper-control over Tor cannot verify it; "
        "move it and its key away and run make-certs again (then reload-certificates)"
    )


def parse_reply(lines: str) -> dict[str, str]:
    """
    C{KEY=VALUE} lines of a control-port reply (C{ADD_ONION}'s C{ServiceID=...}).
    """
    out = {}
    for line in lines.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            out[key] = value
    return out


class OnionService(service.Service):
    """
    Publishes a local listener as an onion service through tor, and keeps it
    published (reconnecting to tor with back-off).

    @ivar state: one of C{off}, C{starting}, C{connecting}, C{publishing} (tor took
        the service; its descriptor is not uploaded yet), C{published} (tor uploaded
        it to at least one HSDir), C{failed} (waiting to try again: see C{error}).
    @ivar address: the onion address (known once the key is loaded).
    @ivar local_port: the loopback port tor forwards the onion's port to.
    """

    def __init__(
        self,
        reactor: Any,
        runner: IBlockingRunner,
        key_directory: str,
        factory: Callable[[], Any],
        onion_port: int = DEFAULT_ONION_PORT,
        control: str = "",
        tor_data_directory: str = "",
        tor_binary: Optional[str] = None,
        tor_config: str = "",
    ) -> None:
        """
        @param factory: makes the protocol factory of the local listener (called at
            start: the PB factory for transport C{pb-onion}).
        @param control: the control endpoint string of the operator's tor; "" to
            launch one (in C{tor_data_directory}).
        @param tor_config: torrc lines added to a launched tor's (tests: a private
            network's authorities, or C{DisableNetwork 1}).
        """
        self.reactor = reactor
        self.runner = runner
        self.key_directory = key_directory
        self.factory = factory
        self.onion_port = onion_port or DEFAULT_ONION_PORT
        self.control = control
        self.tor_data_directory = tor_data_directory
        self.tor_binary = tor_binary
        self.tor_config = tor_config
        self.retry_first = RETRY_FIRST
        self.bootstrap = ""
        self._process: Optional[_TorProcess] = None
        self.state = "off"
        self.error = ""
        self.since = 0.0
        self.address = ""
        self.local_port = 0
        self.publishes = 0
        self.key: Optional[OnionKey] = None
        self._port: Any = None
        self._server: Any = None
        self._tor: Any = None
        self._running: Optional[Deferred[None]] = None
        self._wakeup: Optional[Deferred[None]] = None
        self._stopping = False

    # -- what the status page shows

    def status(self) -> dict[str, Any]:
        """
        The state, address and problem for the status page.
        """
        return {
            "state": self.state,
            "address": self.address,
            "port": self.onion_port,
            "endpoint": f"tor:{self.address}:{self.onion_port}" if self.address else "",
            "error": self.error,
            "since": self.since,
            "tor": self.control or f"launched by the daemon ({self.tor_data_directory})",
            "local_port": self.local_port,
            "bootstrap": self.bootstrap,
        }

    def _set(self, state: str, error: str = "") -> None:
        self.state = state
        self.error = error
        self.since = self.reactor.seconds()

    # -- service

    def startService(self) -> None:
        """
        Listen on loopback, then load the key and publish (in the background).
        """
        super().startService()
        self._stopping = False
        self._set("starting")
        factory = self.factory()
        if hasattr(factory, "tcp_server"):
            # A connection guard (L{hypervisor.netguard}): its port copes with running
            # out of descriptors.
            server = factory.tcp_server(0, "127.0.0.1")
            server.startService()
            self._port = server._port
            self._server = server
        else:
            self._port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.local_port = self._port.getHost().port
        self._running = ensureDeferred(self._run())
        self._running.addErrback(
            lambda f: log.failure("onion service: unexpected failure", failure=f)
        )

    def stopService(self) -> "Deferred[None]":
        """
        Remove the onion service from tor (closing the control connection removes it
        too), stop a tor the daemon launched, stop listening.
        """
        super().stopService()
        self._stopping = True
        if self._wakeup is not None and not self._wakeup.called:
            self._wakeup.cancel()
        steps: list[Deferred[Any]] = []
        if self._tor is not None:
            steps.append(self._close_tor(self._tor))
            self._tor = None
        elif self._process is not None:
            steps.append(self._process.stop(self.reactor))
            self._process = None
        if self._server is not None:
            steps.append(maybeDeferred(self._server.stopService))
            self._server = None
        elif self._port is not None:
            steps.append(maybeDeferred(self._port.stopListening))
        self._port = None
        self._set("off")
        d = Deferred.fromCoroutine(self._all(steps))
        return d

    async def _all(self, steps: list["Deferred[Any]"]) -> None:
        for step in steps:
            try:
                await step
            except Exception as e:  # noqa: BLE001 - stopping: reported, not raised
                log.info("onion service: while stopping: {e}", e=e)

    def _close_tor(self, tor: Any) -> "Deferred[Any]":
        d = Deferred.fromCoroutine(self._close_tor_now(tor))
        timer = self.reactor.callLater(STOP_TIMEOUT, d.cancel)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    async def _close_tor_now(self, tor: Any) -> None:
        """
        DEL_ONION (answered), then close the control connection; a tor we launched
        exits with it (made sure).
        """
        protocol = tor.protocol
        process, self._process = self._process, None
        try:
            if self.address and protocol.transport is not None:
                await protocol.queue_command(f"DEL_ONION {self.address.removesuffix('.onion')}")
        except Exception as e:  # noqa: BLE001 - tor went away meanwhile: nothing to remove
            log.debug("onion service: DEL_ONION: {e}", e=e)
        finally:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            if process is not None:
                await process.stop(self.reactor)

    # -- the publishing loop

    async def _run(self) -> None:
        try:
            key, made = await self.runner.run(load_or_create_key, self.key_directory)
        except (OSError, OnionKeyError) as e:
            self._set("failed", f"cannot use the onion key: {e}")
            log.error("onion service: {why}; PB is not published over Tor", why=self.error)
            return
        self.key = key
        self.address = key.address
        log.info(
            "onion service: address {address} ({how}, in {dir}); clients use "
            "-pbEndpoint tor:{address}:{port}",
            address=self.address,
            how="new key" if made else "key kept from a previous run",
            dir=self.key_directory,
            port=self.onion_port,
        )
        delay = self.retry_first
        while not self._stopping:
            try:
                lost = await self._publish_once()
            except Exception as e:  # noqa: BLE001 - any failure: logged, tried again
                if self._stopping:
                    return
                self._set("failed", self._describe(e))
                log.error(
                    "onion service {address}: {why}; PB is not reachable over Tor, the "
                    "other endpoints are served; trying again in {delay:.0f} s",
                    address=self.address,
                    why=self.error,
                    delay=delay,
                )
            else:
                if self._stopping:
                    return
                self._set("failed", "the connection to tor was lost")
                log.error(
                    "onion service {address}: the connection to tor was lost ({why}); "
                    "trying again in {delay:.0f} s",
                    address=self.address,
                    why=lost,
                    delay=self.retry_first,
                )
                delay = self.retry_first
            self._wakeup = deferLater(self.reactor, delay, lambda: None)
            try:
                await self._wakeup
            except Exception:  # noqa: BLE001 - cancelled by stopService
                return
            delay = min(delay * 2, RETRY_MAX)

    def _describe(self, e: Exception) -> str:
        where = f"tor's control port {self.control}" if self.control else "the tor launched"
        text = str(e) or e.__class__.__name__
        if self.control and isinstance(e, OSError):
            return f"cannot reach {where}: {text}"
        return f"{where}: {text}"

    async def _connect(self) -> Any:
        from twisted.internet.endpoints import clientFromString

        if self.control:
            self._set("connecting")
            endpoint = clientFromString(self.reactor, self.control)
            try:
                return await txtorcon.connect(self.reactor, endpoint)
            except Exception as e:  # noqa: BLE001 - one sentence for the operator
                raise OSError(
                    f"{e} (is tor running with ControlPort there and CookieAuthentication "
                    "1, its cookie readable by the daemon?)"
                ) from None
        self._set("connecting", "launching tor")
        return await self._launch()

    async def _launch(self) -> Any:
        """
        Start our own tor (DataDirectory C{tor_data_directory}, control socket in it,
        cookie authentication, no SOCKS port, owned by this process) and connect.
        Unlike C{txtorcon.launch}, this does not wait for tor to bootstrap: the
        service is added at once and tor publishes it when it reaches the network.
        """
        from twisted.internet.endpoints import UNIXClientEndpoint

        directory = self.tor_data_directory
        control = os.path.join(directory, "control.sock")
        torrc = os.path.join(directory, "torrc")
        text = (
            f"DataDirectory {directory}\nControlPort unix:{control}\n"
            "CookieAuthentication 1\nSocksPort 0\nLog notice stdout\n"
            f"__OwningControllerProcess {os.getpid()}\n" + self.tor_config
        )
        binary = await self.runner.run(
            _prepare_tor_directory, directory, torrc, text, control, self.tor_binary
        )
        process = _TorProcess()
        self._process = process
        process.transport = self.reactor.spawnProcess(
            process, binary, [binary, "-f", torrc], env={"HOME": directory}, path=directory
        )
        deadline = self.reactor.seconds() + LAUNCH_TIMEOUT
        while True:
            if process.ended.called:
                raise OSError(f"tor ({binary}) exited: {process.last_lines()}")
            try:
                tor = await txtorcon.connect(
                    self.reactor, UNIXClientEndpoint(self.reactor, control)
                )
                break
            except Exception as e:  # noqa: BLE001 - not listening yet: try again
                if self.reactor.seconds() > deadline:
                    process.stop()
                    raise OSError(f"tor ({binary}) did not open {control}: {e}") from None
            await deferLater(self.reactor, 0.1, lambda: None)
        # Tor exits when this control connection closes (and, by
        # __OwningControllerProcess, when the daemon dies).
        await tor.protocol.queue_command("TAKEOWNERSHIP")
        await tor.protocol.add_event_listener("STATUS_CLIENT", self._status_client)
        return tor

    def _status_client(self, text: str) -> None:
        match = re.search(r"BOOTSTRAP PROGRESS=(\d+).*SUMMARY=\"([^\"]*)\"", text)
        if match is not None:
            self.bootstrap = f"tor bootstrapped {match.group(1)}% ({match.group(2)})"

    async def _publish_once(self) -> str:
        """
        Connect to tor, add the service; return (why) when the connection is lost.
        """
        assert self.key is not None
        tor = await self._connect()
        if self._stopping:
            await self._close_tor(tor)
            return "stopping"
        self._tor = tor
        protocol = tor.protocol
        disconnected = protocol.when_disconnected()
        await protocol.add_event_listener("HS_DESC", self._hs_desc)
        reply = await protocol.queue_command(
            f"ADD_ONION {self.key.blob} Flags=DiscardPK "
            f"Port={self.onion_port},127.0.0.1:{self.local_port}"
        )
        service_id = parse_reply(reply).get("ServiceID", "")
        if service_id + ".onion" != self.address:
            raise RuntimeError(f"tor published {service_id}.onion for our key, not {self.address}")
        self.publishes += 1
        self._set("publishing")
        log.info(
            "onion service {address}: added to tor ({tor}), port {port} -> "
            "127.0.0.1:{local}; uploading its descriptor",
            address=self.address,
            tor=self.control or "launched",
            port=self.onion_port,
            local=self.local_port,
        )
        try:
            await disconnected
        except Exception as e:  # noqa: BLE001 - the reason of the loss
            return str(e.__class__.__name__ if not str(e) else e)
        finally:
            self._tor = None
            process, self._process = self._process, None
            if process is not None:
                process.stop(self.reactor)
        return "closed"

    def _hs_desc(self, text: str) -> None:
        words = text.split()
        if len(words) < 2 or words[1] + ".onion" != self.address:
            return
        if words[0] == "UPLOADED" and self.state == "publishing":
            self._set("published")
            log.info("onion service {address}: published", address=self.address)
        elif words[0] == "FAILED" and self.state == "publishing":
            self.error = "a descriptor upload failed (tor tries other HSDirs)"


def _prepare_tor_directory(
    directory: str, torrc: str, text: str, control: str, binary: Optional[str]
) -> str:
    """
    The launched tor's DataDirectory (0700, as tor demands), its torrc, and no stale
    control socket; return the tor binary to run (C{binary}, or C{tor} on C{PATH}).

    @raise OSError: no tor binary.
    """
    found = binary or shutil.which("tor")
    if not found:
        raise OSError("no tor binary on PATH (Debian: apt-get install tor)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    store.atomic_write(torrc, text.encode("utf-8"), mode=0o600)
    try:
        os.unlink(control)
    except FileNotFoundError:
        pass
    return found


class _TorProcess(ProcessProtocol):
    """
    The tor the daemon launched: its last output lines (for errors), its end.
    """

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.lines: deque[str] = deque(maxlen=LAST_LINES)
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        """
        Keep the last lines tor printed (bounded).
        """
        data = self._partial + data
        *whole, self._partial = data.split(b"\n")
        self._partial = self._partial[-4096:]
        for line in whole[-LAST_LINES:]:
            self.lines.append(line.decode("utf-8", "replace")[:500])

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        """
        Tor is gone.
        """
        if not self.ended.called:
            self.ended.callback(None)

    def last_lines(self) -> str:
        """
        What tor said last (its error).
        """
        return " / ".join(list(self.lines)[-3:]) or "no output"

    def stop(self, reactor: Any = None) -> "Deferred[None]":
        """
        SIGTERM now, SIGKILL if still there after L{STOP_TIMEOUT}; fires when gone.
        """
        transport = self.transport
        if self.ended.called or transport is None:
            return succeed(None)
        try:
            transport.signalProcess("TERM")
        except ProcessExitedAlready:
            return succeed(None)
        if reactor is not None:

            def kill() -> None:
                try:
                    transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass

            timer = reactor.callLater(STOP_TIMEOUT, kill)
            self.ended.addBoth(lambda r: timer.cancel() if timer.active() else None)
        d: Deferred[None] = Deferred()
        self.ended.addBoth(lambda _: d.callback(None))
        return d


def make_onion_service(
    options: Any, pb_service: Callable[[], Any], runner: IBlockingRunner, reactor: Any
) -> OnionService:
    """
    The C{onion} service for C{-pbOnion}: the PB factory of L{hypervisor.pb.server}
    (sharing the C{pb} service's dispatcher, TLS, admin surface and sessions) on a
    loopback listener, published through C{-torControl}'s tor or one launched.

    @param pb_service: returns the C{pb} service (called at start, so that this
        service can be made before it, e.g. for the status pages).
    """
    from hypervisor.pb.server import LIMITS, make_pb_factory

    # Every onion connection comes from the local tor: no per-source cap below the
    # total one.
    limits = dataclasses.replace(LIMITS, max_idle_per_source=LIMITS.max_idle_total)

    def factory() -> Any:
        pb = pb_service()
        return make_pb_factory(
            pb.dispatcher,
            pb.tls,
            reactor,
            admin=pb.admin,
            sessions=pb.sessions,
            transport="pb-onion",
            limits=limits,
        ).factory

    state_dir = options["stateDir"]
    return OnionService(
        reactor,
        runner,
        os.path.join(state_dir, ONION_DIRECTORY),
        factory,
        onion_port=options["pbPortNum"] or DEFAULT_ONION_PORT,
        control=options["torControl"],
        tor_data_directory=os.path.join(state_dir, "tor"),
        tor_config=f"%include {options['torConfigFile']}\n" if options["torConfigFile"] else "",
    )
