"""
Tests for L{hypervisor.codec} and L{hypervisor.model}: Go-compatible JSON.
"""

from __future__ import annotations

import datetime
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import codec, model

texts = st.text(max_size=20)
ips = st.builds(lambda a, b: f"10.{a}.{b}.2", st.integers(0, 255), st.integers(0, 255))
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
hostnames = st.just("") | st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}",
    fullmatch=True)
times = st.one_of(st.none(), st.datetimes(
    min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2200, 1, 1),
    timezones=st.just(datetime.timezone.utc)))

volumes = st.builds(model.Volume, Format=st.sampled_from(model.VolumeFormat),
                    Interface=st.sampled_from(model.VolumeInterface),
                    Size=st.integers(0, 2**50),
                    Snapshots=st.dictionaries(texts, st.integers(0, 2**40), max_size=2),
                    Type=st.sampled_from(model.VolumeType),
                    VirtualSize=st.integers(0, 2**50))
vm_infos = st.builds(
    model.VmInfo,
    Address=st.builds(model.Address, IpAddress=ips, MacAddress=macs),
    ChangedStateOn=times, CreatedOn=times, IdentityExpires=times,
    CpuPriority=st.integers(-20, 19), DestroyOnPowerdown=st.booleans(),
    Hostname=hostnames, MemoryInMiB=st.integers(0, 2**20), MilliCPUs=st.integers(0, 10**5),
    OwnerUsers=st.lists(texts, max_size=3), OwnerGroups=st.lists(texts, max_size=3),
    State=st.sampled_from(model.State), Tags=st.dictionaries(texts, texts, max_size=3),
    Volumes=st.lists(volumes, max_size=3),
    ConsoleType=st.sampled_from(model.ConsoleType),
    MachineType=st.sampled_from(model.MachineType),
    CloudInitDatasource=st.sampled_from(model.CloudInitDatasource),
)


class CodecTests(SynchronousTestCase):
    """
    Round trips, Go's conventions, and errors that name the field.
    """

    @settings(max_examples=200)
    @given(vm_infos, st.lists(st.builds(model.VolumeLocation, DirectoryToCleanup=texts,
                                        Filename=texts), max_size=3))
    def test_round_trip(self, info: model.VmInfo, locations: list) -> None:
        """
        decode(encode(x)) == x for LocalVmInfo (the info.json format).
        """
        local = model.LocalVmInfo(VmInfo=info, VolumeLocations=locations)
        self.assertEqual(codec.decode(model.LocalVmInfo, codec.encode(local)), local)

    @given(st.binary(max_size=200))
    def test_random_bytes(self, data: bytes) -> None:
        """
        Decoding random bytes raises only L{codec.DecodeError}.
        """
        try:
            codec.decode(model.CreateVmRequest, data)
        except codec.DecodeError:
            pass

    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(
        allow_nan=False) | texts, lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["MemoryInMiB", "Address", "Tags", "Volumes", "State", "x",
                         "OwnerUsers", "DhcpTimeout", "IdentityKey", "CreatedOn"]),
        c, max_size=4), max_leaves=10))
    def test_random_json(self, value: object) -> None:
        """
        Decoding any JSON value raises only L{codec.DecodeError}.
        """
        try:
            codec.decode(model.CreateVmRequest, json.dumps(value))
        except codec.DecodeError:
            pass

    def test_go_conventions(self) -> None:
        """
        Enums are text, durations nanoseconds, bytes base64, zero times Go's zero
        time; omitempty fields are left out when zero; embedded VmInfo is flattened;
        names match case-insensitively; unknown fields are ignored.
        """
        request = model.CreateVmRequest(
            VmInfo=model.VmInfo(MemoryInMiB=64, State=model.State.FAILED_TO_START),
            DhcpTimeout=codec.Duration(1.5), IdentityKey=b"\x00key")
        data = codec.to_dict(request)
        self.assertEqual(data["MemoryInMiB"], 64)
        self.assertEqual(data["State"], "failed to start")
        self.assertEqual(data["DhcpTimeout"], 1_500_000_000)
        self.assertEqual(data["IdentityKey"], "AGtleQ==")
        self.assertEqual(data["CreatedOn"], "0001-01-01T00:00:00Z")
        self.assertNotIn("Hostname", data)
        self.assertNotIn("VmInfo", data)
        back = codec.decode(model.CreateVmRequest,
                            b'{"memoryinmib": 32, "NoSuchField": [1], "dhcptimeout": 2e9}')
        self.assertEqual(back.VmInfo.MemoryInMiB, 32)
        self.assertEqual(back.DhcpTimeout, 2.0)

    def test_errors_name_the_field(self) -> None:
        """
        A wrong type or unknown enum text is a DecodeError naming the field.
        """
        for text, words in [
            (b'{"MemoryInMiB": "64"}', "CreateVmRequest.MemoryInMiB: expected an integer"),
            (b'{"MemoryInMiB": 1.5}', "expected an integer"),
            (b'{"Tags": {"a": 1}}', "CreateVmRequest.Tags['a']: expected a string"),
            (b'{"Volumes": [{"Format": "vmdk"}]}', "Volumes[0].Format: unknown VolumeFormat"),
            (b'{"IdentityKey": "!!"}', "not valid base64"),
            (b'{"CreatedOn": "yesterday"}', "RFC 3339"),
            (b'[1]', "expected an object"),
            (b'{', "malformed JSON"),
            (b'{"DoNotStart": "yes"}', "expected true or false"),
        ]:
            e = self.assertRaises(codec.DecodeError, codec.decode, model.CreateVmRequest, text)
            self.assertIn(words, str(e), text)

    def test_state_numbers(self) -> None:
        """
        State numbers are the reference's (the IgnoreStateMask bits).
        """
        self.assertEqual([s.number for s in (model.State.STARTING, model.State.RUNNING,
                                             model.State.STOPPED, model.State.DEBUGGING)],
                         [0, 1, 4, 9])
