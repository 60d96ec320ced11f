"""
Tests for L{hypervisor.tftp.codec}: golden packets from RFC 1350/2347 and real
clients' requests, round trips of every packet kind (hypothesis), and malformed or
random bytes raising only L{MalformedPacket}.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.tftp import codec
from hypervisor.tftp.codec import MalformedPacket

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))

text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40
).filter(lambda t: len(t.encode("utf-8")) <= codec.MAX_TEXT)
names = (
    text.filter(lambda t: t != "")
    .map(str.lower)
    .filter(lambda t: t != "" and t == t.lower() and len(t.encode()) <= codec.MAX_TEXT)
)
options = st.dictionaries(names, text, max_size=6)


@st.composite
def packets(draw: Any) -> codec.Packet:
    """
    Any packet the codec can encode.
    """
    kind = draw(st.sampled_from(["rrq", "wrq", "data", "ack", "error", "oack"]))
    if kind in ("rrq", "wrq"):
        return codec.Request(
            codec.RRQ if kind == "rrq" else codec.WRQ,
            draw(text.filter(bool)),
            draw(st.sampled_from(codec.MODES)),
            draw(options),
        )
    if kind == "data":
        return codec.Data(draw(st.integers(0, 65535)), draw(st.binary(max_size=1500)))
    if kind == "ack":
        return codec.Ack(draw(st.integers(0, 65535)))
    if kind == "error":
        return codec.Error(draw(st.integers(0, 65535)), draw(text))
    return codec.OptionAck(draw(st.dictionaries(names, text, min_size=1, max_size=6)))


class GoldenTests(SynchronousTestCase):
    """
    Known bytes decode to known packets and back.
    """

    def test_curl_request(self) -> None:
        """
        curl's read request (tsize, blksize, timeout) decodes with its options in order.
        """
        raw = b"\x00\x01big.bin\x00octet\x00tsize\x000\x00blksize\x001428\x00timeout\x006\x00"
        packet = codec.decode(raw)
        self.assertEqual(
            packet,
            codec.Request(
                codec.RRQ, "big.bin", "octet", {"tsize": "0", "blksize": "1428", "timeout": "6"}
            ),
        )
        self.assertEqual(codec.encode(packet), raw)

    def test_case_of_mode_and_option_names(self) -> None:
        """
        Modes and option names are case-insensitive (RFC 1350, 2347): decoded lower case.
        """
        packet = codec.decode(b"\x00\x01pxelinux.0\x00OCTET\x00BlkSize\x001432\x00")
        self.assertEqual(
            packet, codec.Request(codec.RRQ, "pxelinux.0", "octet", {"blksize": "1432"})
        )

    def test_data_ack_error_oack(self) -> None:
        """
        DATA, ACK, ERROR and OACK have their RFC layouts.
        """
        self.assertEqual(codec.encode(codec.Data(1, b"abc")), b"\x00\x03\x00\x01abc")
        self.assertEqual(codec.encode(codec.Ack(65535)), b"\x00\x04\xff\xff")
        self.assertEqual(
            codec.encode(codec.Error(1, "File not found")), b"\x00\x05\x00\x01File not found\x00"
        )
        self.assertEqual(
            codec.encode(codec.OptionAck({"blksize": "1428", "tsize": "42"})),
            b"\x00\x06blksize\x001428\x00tsize\x0042\x00",
        )
        self.assertEqual(codec.data_packet(7, b"x"), codec.encode(codec.Data(7, b"x")))

    def test_error_packet_cut_and_clean(self) -> None:
        """
        error_packet() cuts a long message on a character boundary and removes NULs.
        """
        raw = codec.error_packet(2, "é" * 400 + "\0x")
        packet = codec.decode(raw)
        assert isinstance(packet, codec.Error)
        self.assertEqual(packet.code, 2)
        self.assertLessEqual(len(packet.message.encode()), codec.MAX_TEXT)
        self.assertEqual(set(packet.message), {"é"})


class MalformedTests(SynchronousTestCase):
    """
    Each kind of malformed packet raises MalformedPacket with a reason.
    """

    def check(self, raw: bytes, words: str) -> None:
        with self.assertRaises(MalformedPacket) as e:
            codec.decode(raw)
        self.assertIn(words, str(e.exception))

    def test_malformed(self) -> None:
        """
        Short packets, unknown opcodes, missing NULs, bad modes, empty names, odd
        options, repeated options, oversized ACKs and non-UTF-8 names are refused.
        """
        self.check(b"\x00\x01", "at least 4 bytes")
        self.check(b"\x00\x09\x00\x00", "unknown opcode 9")
        self.check(b"\x00\x01file\x00octet", "not NUL-terminated")
        self.check(b"\x00\x01file\x00binary\x00", "mode 'binary'")
        self.check(b"\x00\x01\x00octet\x00", "file name is empty")
        self.check(b"\x00\x01file\x00\x00", "mode '' is not")
        self.check(b"\x00\x01f\x00octet\x00blksize\x00", "has no value")
        self.check(b"\x00\x01f\x00octet\x00a\x001\x00A\x002\x00", "given twice")
        self.check(b"\x00\x01f\x00octet\x00\x001\x00", "option name is empty")
        self.check(b"\x00\x04\x00\x01\x00", "an ACK has 4 bytes")
        self.check(b"\x00\x01\xff\xfe\x00octet\x00", "not UTF-8")
        self.check(b"\x00\x05\x00\x01a\x00b\x00", "NUL inside")
        self.check(b"\x00\x01" + b"a" * 600 + b"\x00octet\x00", "longer than 512")
        self.check(b"\x00\x03\x00\x01" + b"x" * (codec.MAX_DATA + 1), "at most")
        many = b"".join(b"o%d\x001\x00" % i for i in range(codec.MAX_OPTIONS + 1))
        self.check(b"\x00\x01f\x00octet\x00" + many, "more than")

    def test_encode_refuses(self) -> None:
        """
        encode() refuses what could not be decoded again.
        """
        for packet in (
            codec.Request(codec.RRQ, "a\0b"),
            codec.Request(codec.RRQ, ""),
            codec.Request(codec.DATA, "x"),
            codec.Data(1, b"x" * (codec.MAX_DATA + 1)),
            codec.OptionAck({"": "1"}),
            codec.OptionAck({}),
        ):
            self.assertRaises(ValueError, codec.encode, packet)


class PropertyTests(SynchronousTestCase):
    """
    Round trips and fuzzing.
    """

    @SETTINGS
    @given(packets())
    def test_round_trip(self, packet: codec.Packet) -> None:
        """
        decode(encode(p)) == p for every packet.
        """
        self.assertEqual(codec.decode(codec.encode(packet)), packet)

    @SETTINGS
    @given(st.binary(max_size=700))
    def test_random_bytes(self, raw: bytes) -> None:
        """
        Random bytes decode or raise MalformedPacket, nothing else; what decodes
        encodes back to a packet that decodes the same.
        """
        try:
            packet = codec.decode(raw)
        except MalformedPacket:
            return
        self.assertEqual(codec.decode(codec.encode(packet)), packet)

    @SETTINGS
    @given(packets(), st.data())
    def test_truncated_and_mutated(self, packet: codec.Packet, data: Any) -> None:
        """
        A real packet cut short or with one byte changed raises only MalformedPacket.
        """
        raw = bytearray(codec.encode(packet))
        cut = data.draw(st.integers(0, len(raw)))
        if raw:
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
        for candidate in (bytes(raw[:cut]), bytes(raw)):
            try:
                codec.decode(candidate)
            except MalformedPacket:
                pass
