# -*- test-case-name: tests.test_pb_daemon -*-
"""
The Perspective Broker transport of C{vm-control} and C{hyper-control}
(C{-transport pb}): L{hypervisor.client} over TLS with the tools' certificate, to
C{-pbEndpoint} (a Twisted client endpoint string such as C{tcp:hv1:8787}; by default
C{tcp:<hypervisorHostname>:8787}), one connection kept for the run's calls.

The request and reply JSON are the bytes HTTPS and SRPC carry; progress messages
and stream messages go to C{on_message} as they arrive, each one acknowledged to the
hypervisor only after C{on_message} returned (flow control). An exception raised by
C{on_message} (e.g. hyper-control's C{-maxUpdates} reached) ends the stream and is
raised again by L{PbTransport.call}.
"""

from __future__ import annotations

from typing import Any, Optional

from hypervisor.cli.client import CertPair, ClientError
from hypervisor.cli.transport import OnMessage, Tail
from hypervisor.client import CallFailed, HypervisorClient, connect, endpoint_host
from hypervisor.pb.wire import DEFAULT_PORT

CONNECT_TIMEOUT = 60.0


def default_endpoint(host: str) -> str:
    """
    C{tcp:HOST:8787} (IPv6 addresses escaped as endpoint strings need).
    """
    return f"tcp:{host.replace(':', chr(92) + ':')}:{DEFAULT_PORT}"


class PbTransport:
    """
    Calls over one PB connection.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        pair: Optional[CertPair],
        ca_file: str,
        hostname: str = "",
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.pair = pair
        self.ca_file = ca_file
        self.hostname = hostname or endpoint_host(endpoint)
        self.address = endpoint
        self.description = f"pb+{endpoint}"
        self._client: Optional[HypervisorClient] = None

    async def client(self) -> HypervisorClient:
        """
        The connection (made at the first call).

        @raise ClientError: cannot connect, or the certificate is refused.
        """
        if self._client is None:
            import os

            ca = self.ca_file if self.ca_file and os.path.exists(self.ca_file) else ""
            try:
                self._client = await connect(
                    self.reactor,
                    self.endpoint,
                    self.pair.cert_path if self.pair else None,
                    self.pair.key_path if self.pair else None,
                    ca_file=ca,
                    hostname=self.hostname,
                    timeout=CONNECT_TIMEOUT,
                )
            except CallFailed as e:
                raise ClientError(e.message) from None
        return self._client

    async def call(
        self,
        method: str,
        request: bytes,
        tail: Optional[Tail] = None,
        on_message: Optional[OnMessage] = None,
    ) -> bytes:
        """
        See L{hypervisor.cli.transport.Transport.call}.
        """
        client = await self.client()
        raised: list[BaseException] = []

        def one(data: bytes) -> bool:
            if raised:
                return False
            try:
                if on_message is not None:
                    on_message(data)
            except BaseException as e:  # noqa: B036 - raised again below
                raised.append(e)
                return False
            return True

        try:
            if tail is not None:
                parts, _sizes = tail
                reply = await client.upload(method, request or b"{}", parts, one)
            else:
                reply, _ = await client.call_json(method, request or b"{}", one)
        except CallFailed as e:
            if raised:
                raise raised[0]
            raise ClientError(e.message) from None
        if raised:
            raise raised[0]
        return reply

    async def call_download(self, method: str, request: bytes) -> tuple[bytes, bytes]:
        """
        The reply's JSON and the raw bytes after it.
        """
        client = await self.client()
        try:
            return await client.call_json(method, request or b"{}")
        except CallFailed as e:
            raise ClientError(e.message) from None

    async def admin(self, action: str, request: Optional[dict[str, Any]] = None) -> Any:
        """
        A runtime admin action (L{hypervisor.pb.admin}).
        """
        client = await self.client()
        try:
            return await client.admin(action, request)
        except CallFailed as e:
            raise ClientError(e.message) from None

    def close(self) -> None:
        """
        Close the connection.
        """
        if self._client is not None:
            self._client.close()
            self._client = None
