"""
Tests for L{hypervisor.dhcp.codec}: round trips of every option type and of whole
messages (overloaded C{file}/C{sname} and RFC 3396 long options included), random and
truncated bytes raising only L{MalformedPacket}, and golden packets captured from real
clients (busybox udhcpc, ISC dhclient, dhcpcd, a PXE-style udhcpc and a real iPXE
ROM; regenerate them with C{python -m tests.dhcp_capture}).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.dhcp import codec
from hypervisor.dhcp.codec import MalformedPacket, MessageType, Packet

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dhcp")

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

ips = st.integers(0, 2**32 - 1).map(lambda n: socket.inet_ntoa(n.to_bytes(4, "big")))
text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=60
).filter(lambda t: len(t.encode("utf-8")) <= 255)


@st.composite
def networks(draw: Any) -> str:
    """
    A network in canonical form (no host bits), as RFC 3442 carries it.
    """
    width = draw(st.integers(0, 32))
    address = draw(st.integers(0, 2**32 - 1))
    return str(ipaddress.IPv4Network((address, width), strict=False))


VALUES: dict[str, Any] = {
    "IP": (codec.SUBNET_MASK, ips),
    "IPS": (codec.DNS_SERVERS, st.lists(ips, min_size=1, max_size=16)),
    "U8": (codec.MESSAGE_TYPE, st.integers(0, 255)),
    "U16": (codec.MAX_MESSAGE_SIZE, st.integers(0, 2**16 - 1)),
    "U32": (codec.LEASE_TIME, st.integers(0, 2**32 - 1)),
    "U8S": (codec.PARAMETER_REQUEST_LIST, st.lists(st.integers(0, 255), min_size=1)),
    "U16S": (codec.CLIENT_ARCHITECTURE, st.lists(st.integers(0, 2**16 - 1), min_size=1)),
    "TEXT": (codec.HOST_NAME, text),
    "BYTES": (codec.CLIENT_ID, st.binary(max_size=300)),
    "NDI": (codec.CLIENT_NDI, st.tuples(*[st.integers(0, 255)] * 3)),
    "UUID": (codec.CLIENT_UUID, st.binary(min_size=16, max_size=16)),
    "SUBOPTIONS": (
        codec.RELAY_AGENT_INFORMATION,
        st.dictionaries(st.integers(0, 255), st.binary(min_size=1, max_size=300), max_size=5),
    ),
    "ROUTES": (codec.CLASSLESS_ROUTES, st.lists(st.tuples(networks(), ips), max_size=10)),
}


@st.composite
def packets(draw: Any) -> Packet:
    """
    Any packet the codec can round-trip (see the module docstring of the codec).
    """
    codes = st.integers(1, 254).filter(lambda c: c != codec.OVERLOAD)
    options = draw(st.dictionaries(codes, st.binary(max_size=400), max_size=12))
    return Packet(
        op=draw(st.sampled_from([codec.BOOTREQUEST, codec.BOOTREPLY])),
        htype=draw(st.integers(0, 255)),
        hlen=draw(st.integers(0, 16)),
        hops=draw(st.integers(0, 255)),
        xid=draw(st.integers(0, 2**32 - 1)),
        secs=draw(st.integers(0, 2**16 - 1)),
        flags=draw(st.integers(0, 2**16 - 1)),
        ciaddr=draw(ips),
        yiaddr=draw(ips),
        siaddr=draw(ips),
        giaddr=draw(ips),
        chaddr=draw(st.binary(min_size=16, max_size=16)),
        sname=draw(st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"x"))),
        file=draw(st.binary(max_size=128).map(lambda b: b.replace(b"\0", b"x"))),
        options=options,
    )


def golden(name: str) -> Packet:
    """
    A golden packet, decoded.
    """
    with open(os.path.join(DATA, name + ".bin"), "rb") as f:
        return codec.decode(f.read())


class OptionRoundTripTests(SynchronousTestCase):
    """
    Every option type survives L{codec.option_bytes} then L{codec.option_value}.
    """

    def check(self, kind: str, value: Any) -> None:
        code, _ = VALUES[kind]
        self.assertEqual(codec.option_value(code, codec.option_bytes(code, value)), value)

    @SETTINGS
    @given(st.sampled_from(sorted(VALUES)).flatmap(lambda k: st.tuples(st.just(k), VALUES[k][1])))
    def test_round_trip(self, case: tuple[str, Any]) -> None:
        """
        decode(encode(v)) == v for a value of every option type.
        """
        self.check(*case)

    def test_every_kind_is_covered(self) -> None:
        """
        The strategies above cover every typed option kind of the codec.
        """
        kinds = {kind for kind in vars(codec).values() if isinstance(kind, codec.OptionKind)}
        covered = {codec.OPTION_KINDS.get(code, codec.BYTES) for code, _ in VALUES.values()}
        self.assertEqual(kinds, covered)

    @SETTINGS
    @given(st.sampled_from(sorted(codec.OPTION_KINDS)), st.binary(max_size=64))
    def test_random_values_raise_only_malformed(self, code: int, raw: bytes) -> None:
        """
        Typed decoding of any bytes returns a value or raises L{MalformedPacket}.
        """
        try:
            codec.option_value(code, raw)
        except MalformedPacket:
            pass

    def test_classless_routes_wire_format(self) -> None:
        """
        Option 121 is RFC 3442's: width, significant octets, router.
        """
        raw = codec.option_bytes(
            codec.CLASSLESS_ROUTES,
            [
                ("169.254.169.254/32", "10.0.0.1"),
                ("0.0.0.0/0", "10.0.0.1"),
                ("10.8.0.0/14", "10.0.0.2"),
            ],
        )
        self.assertEqual(
            raw,
            bytes([32, 169, 254, 169, 254, 10, 0, 0, 1, 0, 10, 0, 0, 1, 14, 10, 8, 10, 0, 0, 2]),
        )

    def test_bad_values(self) -> None:
        """
        Values that do not fit their type are refused with a sentence.
        """
        cases = [
            (codec.SUBNET_MASK, b"\1\2\3"),
            (codec.ROUTER, b""),
            (codec.LEASE_TIME, b"\0\0\1"),
            (codec.CLASSLESS_ROUTES, bytes([33, 0, 0, 0, 0])),
            (codec.CLASSLESS_ROUTES, bytes([24, 10, 0])),
            (codec.CLASSLESS_ROUTES, bytes([8, 10, 1, 0, 0, 1]) + bytes([16, 10, 1, 1])),
            (codec.CLASSLESS_ROUTES, bytes([16, 10, 1, 2, 0, 0, 1])[:5]),
            (codec.CLIENT_UUID, bytes(16)),
            (codec.CLIENT_NDI, b"\1\2"),
            (codec.HOST_NAME, b"\xff\xfe"),
            (codec.RELAY_AGENT_INFORMATION, b"\1\5ab"),
        ]
        for code, raw in cases:
            self.assertRaises(MalformedPacket, codec.option_value, code, raw)
        self.assertRaises(ValueError, codec.option_bytes, codec.SUBNET_MASK, "10.0.0")
        self.assertRaises(ValueError, codec.option_bytes, codec.LEASE_TIME, 2**32)


class PacketRoundTripTests(SynchronousTestCase):
    """
    Whole messages survive L{codec.encode} then L{codec.decode}.
    """

    @SETTINGS
    @given(packets())
    def test_round_trip(self, packet: Packet) -> None:
        """
        decode(encode(p)) == p, with room for every option.
        """
        self.assertEqual(codec.decode(codec.encode(packet, max_size=65535)), packet)

    @SETTINGS
    @given(packets())
    def test_round_trip_small(self, packet: Packet) -> None:
        """
        In a 576-byte message, options that do not fit the options field move to
        C{file} and C{sname} (option 52) when those are free, and still decode the
        same; a packet that cannot fit raises L{codec.PacketTooLarge}.
        """
        try:
            data = codec.encode(packet)
        except codec.PacketTooLarge:
            return
        self.assertLessEqual(len(data), 576)
        self.assertEqual(codec.decode(data), packet)

    def test_overload_uses_file_then_sname(self) -> None:
        """
        Options overflow into C{file} first, then C{sname}, and option 52 says so.
        """
        packet = Packet(
            chaddr=bytes(16),
            options={
                codec.MESSAGE_TYPE: b"\x02",
                60: b"a" * 200,
                61: b"b" * 100,
                62: b"c" * 100,
                63: b"d" * 40,
            },
        )
        data = codec.encode(packet, max_size=576)
        self.assertEqual(data[240:243], bytes([codec.OVERLOAD, 1, 3]))
        self.assertEqual(data[codec.FILE_START], 62)
        self.assertEqual(data[codec.SNAME_START], 63)
        self.assertEqual(codec.decode(data), packet)

    def test_long_options_are_split(self) -> None:
        """
        A value longer than 255 bytes is sent as several instances (RFC 3396).
        """
        packet = Packet(options={codec.MESSAGE_TYPE: b"\x05", 77: bytes(range(256)) * 2})
        data = codec.encode(packet, max_size=1500)
        self.assertEqual(data[243:245], bytes([77, 255]))
        self.assertEqual(data[243 + 257 : 243 + 259], bytes([77, 255]))
        self.assertEqual(codec.decode(data).options[77], bytes(range(256)) * 2)

    def test_replies_padded(self) -> None:
        """
        Replies are padded to the BOOTP minimum, and the padding decodes away.
        """
        packet = Packet(op=codec.BOOTREPLY, options={codec.MESSAGE_TYPE: b"\x02"})
        data = codec.encode(packet, min_size=codec.MIN_BOOTP)
        self.assertEqual(len(data), 300)
        self.assertEqual(codec.decode(data), packet)

    def test_codec_options_refused(self) -> None:
        """
        The pad, overload and end codes are the codec's own.
        """
        for code in (0, 52, 255):
            self.assertRaises(ValueError, codec.encode, Packet(options={code: b"\1"}))


class MalformedTests(SynchronousTestCase):
    """
    Bad input raises only L{MalformedPacket}, with a sentence.
    """

    @SETTINGS
    @given(st.binary(max_size=700))
    def test_random_bytes(self, data: bytes) -> None:
        """
        decode(random bytes) returns a packet or raises L{MalformedPacket}.
        """
        try:
            codec.decode(data)
        except MalformedPacket:
            pass

    @SETTINGS
    @given(st.binary(max_size=460))
    def test_random_options(self, tail: bytes) -> None:
        """
        A valid header followed by random options (often overloaded) decodes or raises
        L{MalformedPacket}; whatever decodes re-encodes to the same packet.
        """
        head = codec.encode(Packet())[: codec.OPTIONS_START]
        try:
            packet = codec.decode(head + tail)
        except MalformedPacket:
            return
        self.assertEqual(codec.decode(codec.encode(packet, max_size=65535)), packet)

    @SETTINGS
    @given(
        st.sampled_from(sorted(os.listdir(DATA))).filter(lambda n: n.endswith(".bin")),
        st.integers(0, 400),
    )
    def test_truncated_golden(self, name: str, cut: int) -> None:
        """
        Every prefix of a real client's packet decodes or raises L{MalformedPacket}.
        """
        with open(os.path.join(DATA, name), "rb") as f:
            data = f.read()[:cut]
        try:
            codec.decode(data)
        except MalformedPacket:
            pass

    def test_reasons(self) -> None:
        """
        The sentences say what is wrong.
        """
        good = codec.encode(Packet(options={codec.MESSAGE_TYPE: b"\x01"}))
        cases = [
            (good[:100], "too short"),
            (b"\x03" + good[1:], "neither 1 (request) nor 2 (reply)"),
            (good[:2] + b"\x11" + good[3:], "hlen is 17"),
            (good[:236] + b"\0\0\0\0" + good[240:], "magic cookie"),
            (good[:240] + bytes([53, 5, 1]), "only 1 remain"),
            (good[:240] + bytes([53]), "no length byte"),
            (good[:240] + bytes([52, 1, 4, 255]), "one byte of 1, 2 or 3"),
        ]
        for data, reason in cases:
            with self.assertRaises(MalformedPacket) as caught:
                codec.decode(data)
            self.assertIn(reason, str(caught.exception))


class GoldenTests(SynchronousTestCase):
    """
    Packets captured from real clients decode as expected.
    """

    def test_udhcpc(self) -> None:
        """
        busybox udhcpc: DISCOVER then REQUEST (selecting: server id and requested IP),
        client id 1 + MAC, its default parameter request list.
        """
        discover = golden("udhcpc-discover")
        self.assertEqual(discover.message_type, MessageType.DISCOVER)
        self.assertEqual(discover.mac, "52:54:0a:2c:00:11")
        self.assertEqual(discover.get(codec.PARAMETER_REQUEST_LIST), [1, 3, 6, 12, 15, 28, 42])
        self.assertEqual(discover.get(codec.CLIENT_ID), b"\x01" + codec.mac_bytes(discover.mac))
        self.assertEqual(discover.get(codec.MAX_MESSAGE_SIZE), 576)
        self.assertFalse(discover.broadcast)
        request = golden("udhcpc-request")
        self.assertEqual(request.message_type, MessageType.REQUEST)
        self.assertEqual(request.xid, discover.xid)
        self.assertEqual(request.get(codec.SERVER_ID), "10.44.0.1")
        self.assertEqual(request.get(codec.REQUESTED_IP), "10.44.0.81")
        self.assertEqual(request.ciaddr, "0.0.0.0")

    def test_dhclient(self) -> None:
        """
        ISC dhclient: asks for option 121 and the host name, sends its own host name;
        from its lease file it sends an INIT-REBOOT REQUEST (no server id).
        """
        discover = golden("dhclient-discover")
        self.assertEqual(discover.message_type, MessageType.DISCOVER)
        self.assertEqual(discover.mac, "52:54:0a:2c:00:12")
        prl = discover.get(codec.PARAMETER_REQUEST_LIST)
        for code in (1, 3, 6, 12, 15, 28, 121):
            self.assertIn(code, prl)
        self.assertIsInstance(discover.get(codec.HOST_NAME), str)
        reboot = golden("dhclient-reboot")
        self.assertEqual(reboot.message_type, MessageType.REQUEST)
        self.assertNotIn(codec.SERVER_ID, reboot.options)
        self.assertEqual(reboot.get(codec.REQUESTED_IP), "10.44.0.82")
        self.assertEqual(reboot.ciaddr, "0.0.0.0")

    def test_dhcpcd(self) -> None:
        """
        dhcpcd: a DUID client id, rapid commit (80, empty), 121 requested.
        """
        discover = golden("dhcpcd-discover")
        self.assertEqual(discover.message_type, MessageType.DISCOVER)
        self.assertEqual(discover.mac, "52:54:0a:2c:00:13")
        self.assertEqual(discover.options[80], b"")
        self.assertEqual(discover.get(codec.CLIENT_ID)[0], 0xFF)
        self.assertIn(121, discover.get(codec.PARAMETER_REQUEST_LIST))
        request = golden("dhcpcd-request")
        self.assertEqual(request.get(codec.REQUESTED_IP), "10.44.0.83")

    def test_pxe_udhcpc(self) -> None:
        """
        udhcpc made to look like PXE firmware: vendor class PXEClient, architecture 0
        (BIOS), boot file and TFTP server requested.
        """
        discover = golden("pxe-discover")
        self.assertEqual(discover.get(codec.VENDOR_CLASS), b"PXEClient:Arch:00000:UNDI:002001")
        self.assertEqual(discover.get(codec.CLIENT_ARCHITECTURE), [0])
        self.assertIn(67, discover.get(codec.PARAMETER_REQUEST_LIST))
        self.assertIn(66, discover.get(codec.PARAMETER_REQUEST_LIST))

    def test_ipxe(self) -> None:
        """
        A real iPXE ROM: PXE options 93, 94, 97, vendor class, iPXE's encapsulated
        options (175), a long parameter request list.
        """
        discover = golden("ipxe-discover")
        self.assertEqual(discover.message_type, MessageType.DISCOVER)
        self.assertEqual(discover.mac, "52:54:0a:2c:00:15")
        self.assertEqual(discover.get(codec.VENDOR_CLASS), b"PXEClient:Arch:00000:UNDI:002001")
        self.assertEqual(discover.get(codec.CLIENT_ARCHITECTURE), [0])
        self.assertEqual(discover.get(codec.CLIENT_NDI), (1, 2, 1))
        self.assertEqual(discover.get(codec.CLIENT_UUID), bytes(16))
        self.assertEqual(discover.get(codec.MAX_MESSAGE_SIZE), 1472)
        self.assertEqual(discover.options[77], b"iPXE")
        self.assertIn(175, discover.options)
        prl = discover.get(codec.PARAMETER_REQUEST_LIST)
        self.assertEqual(prl[:6], [1, 3, 6, 7, 12, 15])
        self.assertIn(67, prl)

    def test_golden_round_trip(self) -> None:
        """
        Every golden packet re-encodes to a packet that decodes the same.
        """
        for name in sorted(os.listdir(DATA)):
            if name.endswith(".bin"):
                packet = golden(name[:-4])
                self.assertEqual(codec.decode(codec.encode(packet, max_size=1500)), packet, name)
