"""
Tests for L{hypervisor.codec} and L{hypervisor.model}: Go-compatible JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import codec, model

texts = st.text(max_size=20)
ips = st.builds(lambda a, b: f"10.{a}.{b}.2", st.integers(0, 255), st.integers(0, 255))
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
hostnames = st.just("") | st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}", fullmatch=True
)
times = st.one_of(
    st.none(),
    st.datetimes(
        min_value=datetime.datetime(1970, 1, 2),
        max_value=datetime.datetime(2200, 1, 1),
        timezones=st.just(datetime.timezone.utc),
    ),
)

volumes = st.builds(
    model.Volume,
    Format=st.sampled_from(model.VolumeFormat),
    Interface=st.sampled_from(model.VolumeInterface),
    Size=st.integers(0, 2**50),
    Snapshots=st.dictionaries(texts, st.integers(0, 2**40), max_size=2),
    Type=st.sampled_from(model.VolumeType),
    VirtualSize=st.integers(0, 2**50),
)
vm_infos = st.builds(
    model.VmInfo,
    Address=st.builds(model.Address, IpAddress=ips, MacAddress=macs),
    ChangedStateOn=times,
    CreatedOn=times,
    IdentityExpires=times,
    CpuPriority=st.integers(-20, 19),
    DestroyOnPowerdown=st.booleans(),
    Hostname=hostnames,
    MemoryInMiB=st.integers(0, 2**20),
    MilliCPUs=st.integers(0, 10**5),
    OwnerUsers=st.lists(texts, max_size=3),
    OwnerGroups=st.lists(texts, max_size=3),
    State=st.sampled_from(model.State),
    Tags=st.dictionaries(texts, texts, max_size=3),
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
    @given(
        vm_infos,
        st.lists(
            st.builds(model.VolumeLocation, DirectoryToCleanup=texts, Filename=texts), max_size=3
        ),
    )
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

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
            lambda c: st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "MemoryInMiB",
                        "Address",
                        "Tags",
                        "Volumes",
                        "State",
                        "x",
                        "OwnerUsers",
                        "DhcpTimeout",
                        "IdentityKey",
                        "CreatedOn",
                    ]
                ),
                c,
                max_size=4,
            ),
            max_leaves=10,
        )
    )
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
            DhcpTimeout=codec.Duration(1.5),
            IdentityKey=b"\x00key",
        )
        data = codec.to_dict(request)
        self.assertEqual(data["MemoryInMiB"], 64)
        self.assertEqual(data["State"], "failed to start")
        self.assertEqual(data["DhcpTimeout"], 1_500_000_000)
        self.assertEqual(data["IdentityKey"], "AGtleQ==")
        self.assertEqual(data["CreatedOn"], "0001-01-01T00:00:00Z")
        self.assertNotIn("Hostname", data)
        self.assertNotIn("VmInfo", data)
        back = codec.decode(
            model.CreateVmRequest, b'{"memoryinmib": 32, "NoSuchField": [1], "dhcptimeout": 2e9}'
        )
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
            (b"[1]", "expected an object"),
            (b"{", "malformed JSON"),
            (b'{"DoNotStart": "yes"}', "expected true or false"),
        ]:
            e = self.assertRaises(codec.DecodeError, codec.decode, model.CreateVmRequest, text)
            self.assertIn(words, str(e), text)

    def test_state_numbers(self) -> None:
        """
        State numbers are the reference's (the IgnoreStateMask bits).
        """
        self.assertEqual(
            [
                s.number
                for s in (
                    model.State.STARTING,
                    model.State.RUNNING,
                    model.State.STOPPED,
                    model.State.DEBUGGING,
                )
            ],
            [0, 1, 4, 9],
        )


def _error(case: SynchronousTestCase, cls: type, data: bytes, **kwargs: object) -> str:
    """
    The message of the DecodeError that decoding C{data} must raise.
    """
    return str(case.assertRaises(codec.DecodeError, codec.decode, cls, data, **kwargs))


class ValidationTests(SynchronousTestCase):
    """
    Strict decoding (requests from the network) validates every value and names the
    field: issue 9, findings 4, 6 and 7.
    """

    def test_lone_surrogates_refused(self) -> None:
        """
        A lone surrogate, escaped (C{"\\ud800"}) or as raw bytes (ED A0 80), in every
        string an owner or admin can set is a DecodeError naming the field.
        """
        for escaped in (
            b'"\\ud800"',
            b'"a\\udfffb"',
            b'"\xed\xa0\x80"',
            b'"\\ud83dx"',
            b'"\\ud83d\xed\xb8\x80"',
        ):
            for cls, template, where in [
                (
                    model.ChangeVmTagsRequest,
                    b'{"Tags": {"Name": %s}}',
                    "ChangeVmTagsRequest.Tags['Name']",
                ),
                (model.ChangeVmTagsRequest, b'{"Tags": {%s: "x"}}', "ChangeVmTagsRequest.Tags key"),
                (
                    model.ChangeVmOwnerUsersRequest,
                    b'{"OwnerUsers": ["bob", %s]}',
                    "ChangeVmOwnerUsersRequest.OwnerUsers[1]",
                ),
                (
                    model.ChangeVmOwnerGroupsRequest,
                    b'{"OwnerGroups": [%s]}',
                    "ChangeVmOwnerGroupsRequest.OwnerGroups[0]",
                ),
                (model.CreateVmRequest, b'{"Hostname": %s}', "CreateVmRequest.Hostname"),
                (model.CreateVmRequest, b'{"Tags": {"a": %s}}', "CreateVmRequest.Tags['a']"),
                (
                    model.ChangeOwnersRequest,
                    b'{"OwnerUsers": [%s]}',
                    "ChangeOwnersRequest.OwnerUsers[0]",
                ),
                (
                    model.ChangeOwnersRequest,
                    b'{"OwnerGroups": [%s]}',
                    "ChangeOwnersRequest.OwnerGroups[0]",
                ),
            ]:
                message = _error(self, cls, template % escaped)
                self.assertIn(where, message)
                self.assertIn("not well-formed Unicode", message)

    def test_invalid_utf8_refused(self) -> None:
        """
        Invalid UTF-8 inside a string (a stray byte, an overlong form, a truncated
        sequence) names the field; outside strings it is malformed JSON.
        """
        for raw in (b"\xff", b"\xc0\xaf", b"\xe2\x82", b"\xf4\x90\x80\x80", b"a\x80"):
            message = _error(self, model.ChangeVmTagsRequest, b'{"Tags": {"k": "%s"}}' % raw)
            self.assertIn("ChangeVmTagsRequest.Tags['k']: not well-formed Unicode", message)
        self.assertIn("malformed JSON", _error(self, model.IpRequest, b'{"a": 1\xff}'))
        self.assertIn("malformed JSON", _error(self, model.IpRequest, b"\xef\xbb\xbf{}"))

    def test_well_formed_text_accepted(self) -> None:
        """
        Non-ASCII text, escaped surrogate pairs and characters beyond the BMP are
        fine.
        """
        request = codec.decode(
            model.ChangeVmTagsRequest,
            '{"Tags": {"Name": "caf\u00e9 \\ud83d\\ude00 \U0001f600"}}'.encode(),
        )
        self.assertEqual(request.Tags, {"Name": "caf\u00e9 \U0001f600 \U0001f600"})

    def test_string_and_count_limits(self) -> None:
        """
        Strings are limited (4096 characters by default, 256 for names, ids and map
        keys), lists and maps by element count; the limit itself is accepted.
        """
        ok = codec.decode(
            model.CreateVmRequest,
            json.dumps(
                {
                    "ExtraKernelOptions": "x" * 4096,
                    "OwnerUsers": ["u" * 256],
                    "Tags": {"k" * 256: "v" * 4096},
                }
            ).encode(),
        )
        self.assertEqual(len(ok.VmInfo.ExtraKernelOptions), 4096)
        for data, words in [
            (
                {"ExtraKernelOptions": "x" * 4097},
                "CreateVmRequest.ExtraKernelOptions: 4097 characters is over the limit of 4096",
            ),
            ({"OwnerUsers": ["u" * 257]}, "OwnerUsers[0]: 257 characters is over the limit"),
            ({"Tags": {"k" * 257: "v"}}, "257 characters is over the limit of 256"),
            ({"Tags": {"k": "v" * 4097}}, "4097 characters is over the limit of 4096"),
            (
                {"Tags": {str(i): "" for i in range(1025)}},
                "CreateVmRequest.Tags: 1025 elements is over the limit of 1024",
            ),
            ({"Volumes": [{}] * 129}, "CreateVmRequest.Volumes: 129 elements"),
            ({"StorageIndices": [0] * 129}, "StorageIndices: 129 elements"),
            ({"IdentityKey": "QUFB" * 30000}, "IdentityKey: over the limit of 65536 bytes"),
        ]:
            data_bytes = json.dumps(data).encode()
            self.assertIn(words, _error(self, model.CreateVmRequest, data_bytes))
        for cls, data, words in [
            (
                model.ListVMsResponse,
                {"IpAddresses": [""] * 65537},
                "ListVMsResponse.IpAddresses: 65537 elements is over the limit of 65536",
            ),
            (
                model.Update,
                {"VMs": {str(i): None for i in range(65537)}},
                "Update.VMs: 65537 elements is over the limit of 65536",
            ),
            (model.AddressPool, {"Free": [None] * 65537}, "AddressPool.Free: 65537"),
            (model.UpdateSubnetsRequest, {"Add": [None] * 1025}, "Add: 1025 elements"),
            (
                model.UpdateSubnetsRequest,
                {"Add": [{"DomainNameServers": [""] * 17}]},
                "Add[0].DomainNameServers: 17 elements is over the limit of 16",
            ),
        ]:
            self.assertIn(words, _error(self, cls, json.dumps(data).encode()))

    def test_nesting_depth(self) -> None:
        """
        JSON nested deeper than 32 is a DecodeError, quickly and without recursion,
        even 100,000 deep and unclosed; 32 is accepted.
        """
        self.assertEqual(
            codec.decode(model.IpRequest, '{"x":' + "[" * 31 + "]" * 31 + "}"), model.IpRequest()
        )
        for text in [
            '{"x":' + "[" * 32 + "]" * 32 + "}",
            "[" * 1000 + "]" * 1000,
            '{"a":' * 1000 + "1" + "}" * 1000,
            "[" * 100_000,
            "{" * 100_000,
            '{"Tags":' * 100_000,
        ]:
            self.assertIn("nested", _error(self, model.CreateVmRequest, text.encode()))
        self.assertEqual(codec.nesting_depth('["[[[", {"a": "]]]{"}, [[]]]'), 3)
        self.assertEqual(codec.nesting_depth('"\\"[[[" []'), 1)

    def test_hostnames(self) -> None:
        """
        Hostname fields follow RFC 1123 (empty allowed): labels of letters, digits
        and '-', 1-63 characters, not starting or ending with '-', 253 in all.
        """
        good = [
            "",
            "a",
            "web-1",
            "Web-1.Example.COM",
            "1host",
            "123",
            "a" * 63,
            ".".join(["a" * 63] * 3 + ["b" * 61]),
        ]
        bad = [
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a_b",
            "a b",
            "caf\u00e9",
            "a" * 64,
            ".".join(["a" * 63] * 4),
            "a\n",
            "a\x00",
        ]
        for name in good:
            self.assertEqual(
                codec.decode(
                    model.ChangeVmHostnameRequest, json.dumps({"Hostname": name}).encode()
                ).Hostname,
                name,
            )
            self.assertEqual(
                codec.decode(
                    model.CreateVmRequest, json.dumps({"Hostname": name}).encode()
                ).VmInfo.Hostname,
                name,
            )
        for name in bad:
            self.assertIn(
                "ChangeVmHostnameRequest.Hostname:",
                _error(
                    self, model.ChangeVmHostnameRequest, json.dumps({"Hostname": name}).encode()
                ),
            )
            self.assertIn(
                "CreateVmRequest.Hostname:",
                _error(self, model.CreateVmRequest, json.dumps({"Hostname": name}).encode()),
            )

    def test_addresses(self) -> None:
        """
        IP fields parse as IPv4 (empty = not given); MAC fields as MACs when present.
        """
        self.assertEqual(codec.decode(model.IpRequest, b'{"IpAddress": ""}'), model.IpRequest())
        self.assertEqual(
            codec.decode(model.IpRequest, b'{"IpAddress": "10.0.0.1"}').IpAddress, "10.0.0.1"
        )
        for ip in [
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            " 10.0.0.1",
            "10.0.0.256",
            "::1",
            "10.0.0.1\n",
            "\u0661.2.3.4",
            "x",
        ]:
            data = json.dumps({"IpAddress": ip}).encode()
            self.assertIn("IpRequest.IpAddress: ", _error(self, model.IpRequest, data))
            self.assertIn("is not an IPv4 address", _error(self, model.IpRequest, data))
        for cls, data, where in [
            (
                model.UpdateSubnetsRequest,
                {"Add": [{"Id": "a", "IpGateway": "10.0.0"}]},
                "UpdateSubnetsRequest.Add[0].IpGateway",
            ),
            (
                model.UpdateSubnetsRequest,
                {"Add": [{"DomainNameServers": ["1.1.1.1", "x"]}]},
                "Add[0].DomainNameServers[1]",
            ),
            (
                model.ChangeAddressPoolRequest,
                {
                    "AddressesToAdd": [
                        {"IpAddress": "10.0.0.999", "MacAddress": "52:54:00:00:00:01"}
                    ]
                },
                "AddressesToAdd[0].IpAddress",
            ),
            (
                model.ChangeAddressPoolRequest,
                {"AddressesToAdd": [{"MacAddress": "52:54:00"}]},
                "AddressesToAdd[0].MacAddress: '52:54:00' is not a MAC address",
            ),
            (model.Update, {"VMs": {"not-an-ip": {}}}, "Update.VMs key 'not-an-ip'"),
        ]:
            self.assertIn(where, _error(self, cls, json.dumps(data).encode()))
        pool = codec.decode(
            model.ChangeAddressPoolRequest,
            json.dumps(
                {
                    "AddressesToAdd": [
                        {"MacAddress": "52:54:0A:00:00:01"},
                        {"MacAddress": "52-54-0a-00-00-02", "IpAddress": "10.0.0.2"},
                    ],
                    "AddressesToRemove": [{"IpAddress": "10.0.0.3"}],
                }
            ).encode(),
        )
        self.assertEqual(pool.AddressesToRemove[0].MacAddress, "")

    def test_go_integer_ranges(self) -> None:
        """
        Integers are checked against their Go type: negative unsigned values, values
        beyond the range (2^64, 10^400), non-integers, NaN and Infinity are refused,
        naming the field and the range; the boundaries are accepted.
        """
        for text, words in [
            (
                b'{"VirtualCPUs": 18446744073709551616}',
                "CreateVmRequest.VirtualCPUs: 18446744073709551616 is out of range for uint "
                "(0 to 18446744073709551615)",
            ),
            (
                b'{"VirtualCPUs": 1' + b"0" * 400 + b"}",
                "CreateVmRequest.VirtualCPUs: a 401-digit number is out of range for uint",
            ),
            (b'{"MemoryInMiB": -1}', "MemoryInMiB: -1 is out of range for uint64"),
            (b'{"MilliCPUs": 1e30}', "MilliCPUs: 1000000000000000019884624838656 is out"),
            (b'{"MemoryInMiB": 1.5}', "MemoryInMiB: expected an integer (uint64), got 1.5"),
            (b'{"MemoryInMiB": 1e400}', "MemoryInMiB: expected an integer (uint64), got inf"),
            (b'{"MemoryInMiB": NaN}', "malformed JSON: NaN is not JSON"),
            (b'{"MemoryInMiB": -Infinity}', "malformed JSON: -Infinity is not JSON"),
            (
                b'{"CpuPriority": 9223372036854775808}',
                "CpuPriority: 9223372036854775808 is "
                "out of range for int (-9223372036854775808 to 9223372036854775807)",
            ),
            (b'{"StorageIndices": [0, -1]}', "StorageIndices[1]: -1 is out of range for uint"),
            (
                b'{"DhcpTimeout": 1' + b"0" * 309 + b"}",
                "DhcpTimeout: a 310-digit number is out of range for int64",
            ),
            (
                b'{"DhcpTimeout": 9223372036854775808}',
                "DhcpTimeout: 9223372036854775808 is " "out of range for int64",
            ),
            (b'{"DhcpTimeout": 1.5}', "DhcpTimeout: expected an integer (int64), got 1.5"),
            (b'{"Volumes": [{"Size": 18446744073709551616}]}', "Volumes[0].Size: "),
            (b'{"Volumes": [{"Snapshots": {"a": -1}}]}', "Volumes[0].Snapshots['a']: -1"),
            (b'{"NetworkEntries": [{"NumQueues": -1}]}', "NetworkEntries[0].NumQueues: -1"),
        ]:
            self.assertIn(words, _error(self, model.CreateVmRequest, text))
        for cls, text, words in [
            (
                model.ChangeVmSizeRequest,
                b'{"VirtualCPUs": 18446744073709551616}',
                "ChangeVmSizeRequest.VirtualCPUs: 18446744073709551616 is out of range",
            ),
            (model.ListVMsRequest, b'{"IgnoreStateMask": -1}', "ListVMsRequest.IgnoreStateMask"),
            (
                model.ChangeAddressPoolRequest,
                b'{"MaximumFreeAddresses": {"": -1}}',
                "MaximumFreeAddresses['']: -1 is out of range for uint",
            ),
            (model.UpdateSubnetsRequest, b'{"Add": [{"VlanId": -1}]}', "Add[0].VlanId: -1"),
        ]:
            self.assertIn(words, _error(self, cls, text))
        top = codec.decode(
            model.CreateVmRequest,
            json.dumps(
                {
                    "VirtualCPUs": 2**64 - 1,
                    "MemoryInMiB": 2**64 - 1,
                    "CpuPriority": -(2**63),
                    "DhcpTimeout": 2**63 - 1,
                    "ImageTimeout": -(2**63),
                    "MilliCPUs": 2e9,
                }
            ).encode(),
        )
        self.assertEqual(
            (top.VmInfo.VirtualCPUs, top.VmInfo.CpuPriority, top.VmInfo.MilliCPUs),
            (2**64 - 1, -(2**63), 2_000_000_000),
        )

    def test_every_int_has_a_go_type(self) -> None:
        """
        Every integer of every model class (inside lists, maps and Optional too)
        carries its Go type, and the fields the reference names have the right one.
        """
        import typing

        def ints(tp: object, where: str) -> typing.Iterator[tuple[str, object]]:
            if typing.get_origin(tp) is typing.Union:
                tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            metas: tuple = ()
            if typing.get_origin(tp) is typing.Annotated:
                metas = tp.__metadata__  # type: ignore[attr-defined]
                tp = typing.get_args(tp)[0]
            if tp is int:
                go = [m for m in metas if isinstance(m, codec.GoInt)]
                yield where, go[0].go_type if go else None
            elif typing.get_origin(tp) in (list, dict):
                yield from ints(typing.get_args(tp)[-1], where + "[]")

        found = {}
        for name, cls in vars(model).items():
            if (
                isinstance(cls, type)
                and dataclasses.is_dataclass(cls)
                and cls.__module__ == model.__name__
            ):
                hints = typing.get_type_hints(cls, include_extras=True)
                for f in dataclasses.fields(cls):
                    for where, go in ints(hints[f.name], f"{name}.{f.name}"):
                        found[where] = go
        self.assertNotIn(None, found.values(), found)
        expected = {
            "VmInfo.MemoryInMiB": "uint64",
            "VmInfo.MilliCPUs": "uint",
            "VmInfo.VirtualCPUs": "uint",
            "VmInfo.CpuPriority": "int",
            "CreateVmRequest.ImageDataSize": "uint64",
            "CreateVmRequest.UserDataSize": "uint64",
            "CreateVmRequest.MinimumFreeBytes": "uint64",
            "CreateVmRequest.RoundupPower": "uint64",
            "CreateVmRequest.StorageIndices[]": "uint",
            "VmFilter.IgnoreStateMask": "uint64",
            "Subnet.VlanId": "uint",
            "Volume.Size": "uint64",
            "Volume.VirtualSize": "uint64",
            "Volume.Snapshots[]": "uint64",
            "NetworkEntry.NumQueues": "uint",
            "ChangeAddressPoolRequest.MaximumFreeAddresses[]": "uint",
            "ChangeVmSizeRequest.MemoryInMiB": "uint64",
            "ChangeVmSizeRequest.MilliCPUs": "uint",
            "ChangeVmSizeRequest.VirtualCPUs": "uint",
            "GetCapacityResponse.NumCPUs": "uint",
            "Update.NumCPUs": "uint",
            "Update.MemoryInMiB": "uint64",
            "Update.NumFreeAddresses[]": "uint",
        }
        self.assertEqual({k: found[k] for k in expected}, expected)


class TrustedDecodingTests(SynchronousTestCase):
    """
    Our own state files (info.json, subnets.json, address-pool.json) decode with
    trusted=True: what an older version stored never makes a VM unloadable.
    """

    OLD_INFO = (
        b'{"Address": {"IpAddress": "10.0.0.2", "MacAddress": "52:54:0a:00:00:02"},'
        b' "Hostname": "my_host\xed\xa0\x80", "Tags": {"\\ud800": "x",'
        b' "Name": "' + b"n" * 5000 + b'"}, "OwnerUsers": ["\\udfffbob"],'
        b' "VirtualCPUs": 18446744073709551616, "MilliCPUs": -5,'
        b' "MemoryInMiB": 1' + b"0" * 400 + b', "State": "running",'
        b' "CreatedOn": "2024-01-02T03:04:05", "VolumeLocations": []}'
    )

    def test_repairs_instead_of_refusing(self) -> None:
        """
        Ill-formed strings become U+FFFD, out-of-range integers are clamped, limits
        and formats are not enforced, a time without zone is UTC; each repair is
        reported for the log.
        """
        self.assertRaises(codec.DecodeError, codec.decode, model.LocalVmInfo, self.OLD_INFO)
        repairs: list[str] = []
        local = codec.decode(model.LocalVmInfo, self.OLD_INFO, trusted=True, repairs=repairs)
        info = local.VmInfo
        self.assertEqual(info.Hostname, "my_host\ufffd\ufffd\ufffd")
        self.assertEqual(info.Tags, {"\ufffd": "x", "Name": "n" * 5000})
        self.assertEqual(info.OwnerUsers, ["\ufffdbob"])
        self.assertEqual(
            (info.VirtualCPUs, info.MilliCPUs, info.MemoryInMiB), (2**64 - 1, 0, 2**64 - 1)
        )
        self.assertEqual(
            info.CreatedOn, datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        )
        self.assertEqual(len(repairs), 6, repairs)
        self.assertIn("LocalVmInfo.Hostname: ill-formed Unicode replaced by U+FFFD", repairs)
        self.assertIn(
            "LocalVmInfo.VirtualCPUs: 18446744073709551616 is out of range for "
            "uint; clamped to 18446744073709551615",
            repairs,
        )
        # What is written back is well-formed UTF-8 (the replacement characters as
        # they are, as Go writes a valid U+FFFD) and readable by the strict decoder
        # too (except the limits a request has: the 5000-character tag and the host
        # name).
        again = codec.encode(local)
        self.assertIn("my_host\ufffd\ufffd\ufffd".encode(), again)
        again.decode("utf-8")
        self.assertEqual(codec.decode(model.LocalVmInfo, again, trusted=True), local)

    def test_still_refuses_malformed_json(self) -> None:
        """
        Trusted decoding refuses what is not JSON (truncated, NaN, too deep) and
        values of the wrong kind.
        """
        for data in (
            self.OLD_INFO[:-1],
            b'{"MemoryInMiB": NaN}',
            b"[" * 100_000,
            b'{"MemoryInMiB": "64"}',
            b'{"State": "sleeping"}',
        ):
            self.assertRaises(
                codec.DecodeError, codec.decode, model.LocalVmInfo, data, trusted=True
            )

    def test_from_dict_trusted(self) -> None:
        """
        from_dict takes the same option (subnets.json and address-pool.json are
        parsed first, then decoded item by item).
        """
        data = codec.loads(b'{"Free": [{"IpAddress": "10.0.0.1 ", "MacAddress": "\xff"}]}')
        self.assertRaises(codec.DecodeError, codec.from_dict, model.AddressPool, data)
        repairs: list[str] = []
        pool = codec.from_dict(
            model.AddressPool, data, "address-pool.json", trusted=True, repairs=repairs
        )
        self.assertEqual(pool.Free, [model.Address("10.0.0.1 ", "\ufffd")])
        self.assertEqual(
            repairs,
            ["address-pool.json.Free[0].MacAddress: ill-formed " "Unicode replaced by U+FFFD"],
        )


class FileNameTests(SynchronousTestCase):
    """
    File names of ours (VolumeLocations) keep the bytes of a name that is not UTF-8.
    """

    def test_undecodable_bytes_kept(self) -> None:
        """
        A volume in a directory whose name is not UTF-8 (Python's surrogateescape:
        U+DC80-U+DCFF) is written and read back unchanged, so it stays reachable;
        other lone surrogates in a file name are still repaired; strict decoding
        refuses both.
        """
        name = os.fsdecode(b"/srv/vol\xff/10.0.0.2/root")
        local = model.LocalVmInfo(
            VolumeLocations=[
                model.VolumeLocation(DirectoryToCleanup=os.path.dirname(name), Filename=name)
            ]
        )
        data = codec.encode(local)
        data.decode("ascii")
        self.assertIn(b"vol\\udcff", data)
        repairs: list[str] = []
        back = codec.decode(model.LocalVmInfo, data, trusted=True, repairs=repairs)
        self.assertEqual(back, local)
        self.assertEqual(
            os.fsencode(back.VolumeLocations[0].Filename), b"/srv/vol\xff/10.0.0.2/root"
        )
        self.assertEqual(repairs, [])
        raw = b'{"VolumeLocations": [{"Filename": "/v\xff/\\ud800"}]}'
        repaired = codec.decode(model.LocalVmInfo, raw, trusted=True, repairs=repairs)
        self.assertEqual(repaired.VolumeLocations[0].Filename, "/v\udcff/\ufffd")
        self.assertEqual(len(repairs), 1)
        self.assertRaises(codec.DecodeError, codec.decode, model.LocalVmInfo, data)


class EncodingTests(SynchronousTestCase):
    """
    encode never writes what a Go client refuses.
    """

    def test_ill_formed_strings_written_as_replacement(self) -> None:
        """
        A stray surrogate in memory is written as U+FFFD (what Go's encoder writes
        for invalid UTF-8, and what Go's decoder makes of a lone \\ud800 escape); the
        output is ASCII.
        """
        info = model.VmInfo(Tags={"\ud800k": "v\udfff"}, OwnerUsers=["\udc80"])
        data = codec.encode(info)
        data.decode("ascii")
        self.assertNotIn(b"\\ud8", data)
        self.assertNotIn(b"\\udf", data)
        back = codec.decode(model.VmInfo, data)
        self.assertEqual(back.Tags, {"\ufffdk": "v\ufffd"})
        self.assertEqual(back.OwnerUsers, ["\ufffd"])
        self.assertEqual(json.loads(codec.encode({"\ud800": ["\udc00"]})), {"\ufffd": ["\ufffd"]})

    def test_numbers_within_go_ranges(self) -> None:
        """
        Integers out of their Go type's range are clamped, Durations to int64
        nanoseconds (infinities to the bounds, NaN to 0); a Go pointer (Optional)
        that is 0 is written, as Go writes a non-nil pointer.
        """
        data = codec.to_dict(
            model.CreateVmRequest(
                VmInfo=model.VmInfo(VirtualCPUs=2**70, MemoryInMiB=-3, CpuPriority=-(2**64)),
                DhcpTimeout=codec.Duration(float("inf")),
                ImageTimeout=codec.Duration(float("nan")),
                StorageIndices=[-1, 2**64],
            )
        )
        self.assertEqual(
            (data["VirtualCPUs"], data["MemoryInMiB"], data["CpuPriority"]),
            (2**64 - 1, 0, -(2**63)),
        )
        self.assertEqual(data["DhcpTimeout"], 2**63 - 1)
        self.assertEqual(data["ImageTimeout"], 0)
        self.assertEqual(data["StorageIndices"], [0, 2**64 - 1])
        self.assertEqual(
            codec.to_dict(model.Update(MemoryInMiB=0, NumCPUs=None)), {"MemoryInMiB": 0}
        )
