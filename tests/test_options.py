"""
Tests for L{hypervisor.options.Options} (re-exported as L{tap.options.Options}) and
the Go-flag helpers in L{hypervisor.flags}.
"""

from __future__ import annotations

import os
import re
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import flags
from hypervisor.options import (
    BOOLEAN_NAMES,
    NOT_USED_MARK,
    NOT_USED_YET,
    PARAMETER_NAMES,
    Options,
)
from tests.support import REPO


def help_by_flag(text: str) -> dict[str, str]:
    """
    Split the flags part of C{--help} output into each flag's help, whitespace
    flattened (the description after the flags is left out).
    """
    flat = " ".join(text.split())
    flat = flat[: flat.find("Flags may be given")]
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"(?:^| )--(\w+)", flat)]
    out = {}
    for (start, name), (end, _) in zip(starts, starts[1:] + [(len(flat), "")]):
        out.setdefault(name, flat[start:end])
    return out


def option_reads(name: str) -> list[str]:
    """
    The source files of the daemon (hypervisor/, tap/, web/; not the flag table
    itself) that read flag C{name} as C{options["name"]}.
    """
    pattern = re.compile(r"\[\s*[\"']" + re.escape(name) + r"[\"']\s*\]")
    table = {os.path.join("hypervisor", "options.py"), os.path.join("tap", "options.py")}
    found = []
    for top in ("hypervisor", "tap", "web"):
        for directory, _, files in os.walk(os.path.join(REPO, top)):
            for filename in files:
                path = os.path.join(directory, filename)
                relative = os.path.relpath(path, REPO)
                if not filename.endswith(".py") or relative in table:
                    continue
                with open(path, encoding="utf-8") as f:
                    if pattern.search(f.read()):
                        found.append(relative)
    return found


class OptionsTests(SynchronousTestCase):
    """
    Tests for L{Options}: defaults, flags files, Go-style flags, bad values.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir))

    def parse(self, *argv: str) -> Options:
        options = Options(flags_directory=self.dir)
        options.parseOptions(list(argv))
        return options

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)

    def test_defaults(self) -> None:
        """
        With no flags the Go hypervisor's defaults apply, plus ours.
        """
        o = self.parse()
        self.assertEqual(o["stateDir"], "/var/lib/hypervisor")
        self.assertEqual(o["portNum"], 6976)
        self.assertEqual(o["volumeDirectories"], [])
        self.assertEqual(o["imageServerHostname"], "localhost")
        self.assertEqual(o["imageServerPortNum"], 6971)
        self.assertEqual(o["networkBootImage"], "pxelinux.%d")
        self.assertEqual(o["objectCacheSize"], 10 * 1024**3)
        self.assertEqual(o["username"], "nobody")
        self.assertEqual(o["lockCheckInterval"], 2.0)
        self.assertEqual(o["lockLogTimeout"], 5.0)
        self.assertEqual(o["CAfile"], "/etc/ssl/CA.pem")
        self.assertEqual(o["identityCAfile"], "/etc/ssl/IdentityCA.pem")
        self.assertEqual(o["certFile"], "/etc/ssl/hypervisor/cert.pem")
        self.assertEqual(o["keyFile"], "/etc/ssl/hypervisor/key.pem")
        self.assertEqual(o["logDir"], "/var/log/hypervisor")
        self.assertEqual(o["libvirtUri"], "qemu:///system")
        self.assertEqual(o["domainType"], "auto")
        for name in ("allowUnauthenticatedReads", "dhcpServerOnBridgesOnly", "showVGA"):
            self.assertIs(o[name], False)

    def test_go_style_flags(self) -> None:
        """
        C{-name value}, C{-name=value}, C{--name value} and bare booleans all work.
        """
        o = self.parse(
            "-stateDir",
            "/srv/hv",
            "-portNum=7000",
            "--imageServerHostname",
            "img",
            "--libvirtUri=test:///default",
            "-allowUnauthenticatedReads",
            "--showVGA=true",
            "-volumeDirectories=/a,/b",
            "-objectCacheSize=512M",
            "-lockLogTimeout",
            "1m30s",
        )
        self.assertEqual(o["stateDir"], "/srv/hv")
        self.assertEqual(o["portNum"], 7000)
        self.assertEqual(o["imageServerHostname"], "img")
        self.assertEqual(o["libvirtUri"], "test:///default")
        self.assertIs(o["allowUnauthenticatedReads"], True)
        self.assertIs(o["showVGA"], True)
        self.assertEqual(o["volumeDirectories"], ["/a", "/b"])
        self.assertEqual(o["objectCacheSize"], 512 * 1024**2)
        self.assertEqual(o["lockLogTimeout"], 90.0)

    def test_flags_files_order(self) -> None:
        """
        flags.default < flags.extra < command line; comments and blanks are ignored.
        """
        self.write(
            "flags.default",
            "# defaults\nportNum=7001\nusername=alice\n\n" "showVGA=true\nstateDir=/from/default\n",
        )
        self.write("flags.extra", "portNum = 7002\nshowVGA=false\n")
        o = self.parse("-stateDir=/from/cli")
        self.assertEqual(o["portNum"], 7002)
        self.assertEqual(o["username"], "alice")
        self.assertIs(o["showVGA"], False)
        self.assertEqual(o["stateDir"], "/from/cli")
        o = self.parse("-portNum", "7003", "-showVGA")
        self.assertEqual(o["portNum"], 7003)
        self.assertIs(o["showVGA"], True)

    def test_command_line_false_overrides_file_true(self) -> None:
        """
        C{-flag=false} on the command line undoes C{flag=true} from a flags file.
        """
        self.write("flags.default", "allowUnauthenticatedReads=true\n")
        self.assertIs(self.parse()["allowUnauthenticatedReads"], True)
        self.assertIs(
            self.parse("-allowUnauthenticatedReads=false")["allowUnauthenticatedReads"],
            False,
        )

    def test_bad_values_name_the_flag(self) -> None:
        """
        A bad value is a usage error that names the flag and the value.
        """
        for argv, words in [
            (["-portNum", "70000"], ["-portNum", "70000"]),
            (["-portNum=abc"], ["-portNum", "abc"]),
            (["-domainType=xen"], ["-domainType", "xen", "kvm"]),
            (["-lockCheckInterval=soon"], ["-lockCheckInterval", "soon"]),
            (["-objectCacheSize=lots"], ["-objectCacheSize", "lots"]),
            (["-stateDir=relative/dir"], ["-stateDir", "absolute"]),
            (["-libvirtUri=nonsense"], ["-libvirtUri", "URI"]),
            (["-showVGA=maybe"], ["maybe", "boolean"]),
        ]:
            e = self.assertRaises(usage.UsageError, self.parse, *argv)
            for word in words:
                self.assertIn(word, str(e), argv)
            self.assertNotIn("enforcement", str(e))

    def test_unknown_flag_named(self) -> None:
        """
        An unknown Go-style flag is reported under its full name, not as C{-s}.
        """
        e = self.assertRaises(usage.UsageError, self.parse, "-stateDirr=/x")
        self.assertIn("stateDirr", str(e))

    def test_bad_flags_file_names_file_and_line(self) -> None:
        """
        A malformed line, unknown flag or bad value in a flags file names the file and
        line number.
        """
        self.write("flags.default", "# ok\nportNum\n")
        e = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn("flags.default:2", str(e))
        self.write("flags.default", "noSuchFlag=1\n")
        e = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn("flags.default:1", str(e))
        self.assertIn("noSuchFlag", str(e))
        self.write("flags.default", "")
        self.write("flags.extra", "\nportNum=-1\n")
        e = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn("flags.extra:2", str(e))
        self.assertIn("-portNum", str(e))

    def test_help_lists_every_flag_with_default(self) -> None:
        """
        The help text lists every flag, and the defaults of those that have one.
        """
        text = str(Options(flags_directory=self.dir))
        for name in PARAMETER_NAMES + BOOLEAN_NAMES:
            self.assertIn(f"--{name}", text)
        for default in (
            "/var/lib/hypervisor",
            "6976",
            "pxelinux.%d",
            "10G",
            "2s",
            "qemu:///system",
            "/etc/ssl/CA.pem",
            "/var/log/hypervisor",
        ):
            self.assertIn(default, text)

    def test_help_marks_go_flags_not_used_yet(self) -> None:
        """
        C{--help} marks every Go flag that is accepted but not used yet, and only
        those, as "(accepted for compatibility; not used yet)", names them together
        in the description, and still shows their defaults unchanged.
        """
        text = Options(flags_directory=self.dir).getUsage()
        by_flag = help_by_flag(text)
        for name in PARAMETER_NAMES + BOOLEAN_NAMES:
            if name in NOT_USED_YET:
                self.assertIn(NOT_USED_MARK, by_flag[name], name)
            else:
                self.assertNotIn(NOT_USED_MARK, by_flag[name], name)
        flat = " ".join(text.split())
        description = flat[flat.index("Flags may be given") :]
        for name in NOT_USED_YET:
            self.assertIn(f"-{name}", description)
        self.assertIn("[default: 10G]", by_flag["objectCacheSize"])
        self.assertIn("[default: pxelinux.%d]", by_flag["networkBootImage"])

    def test_not_used_yet_matches_the_daemon(self) -> None:
        """
        The flags marked "not used yet" are exactly those that no daemon module
        reads: a flag that becomes used must lose its mark, and a flag that nothing
        reads must have it.
        """
        self.assertLessEqual(NOT_USED_YET, set(PARAMETER_NAMES + BOOLEAN_NAMES))
        for name in PARAMETER_NAMES + BOOLEAN_NAMES:
            readers = option_reads(name)
            if name in NOT_USED_YET:
                self.assertEqual(readers, [], f"-{name} is read; drop it from NOT_USED_YET")
            else:
                self.assertNotEqual(readers, [], f"nothing reads -{name}; mark it")

    def test_unused_flags_parse_and_round_trip(self) -> None:
        """
        Flags that are not used yet are still parsed, validated and passed on by
        L{Options.go_flags}, so Go flags files keep working.
        """
        self.write(
            "flags.default",
            "username=vmuser\nshowVGA=true\n" "objectCacheSize=1G\nidentityProvider=https://idp\n",
        )
        o = self.parse("-imageServerPortNum=7001", "-dhcpServerOnBridgesOnly")
        self.assertEqual(o["username"], "vmuser")
        self.assertIs(o["showVGA"], True)
        self.assertEqual(o["objectCacheSize"], 1024**3)
        self.assertEqual(o["imageServerPortNum"], 7001)
        self.assertIs(o["dhcpServerOnBridgesOnly"], True)
        again = self.parse(*o.go_flags())
        for name in NOT_USED_YET:
            self.assertEqual(again[name], o[name], name)
        self.assertRaises(usage.UsageError, self.parse, "-imageServerPortNum=99999")

    def test_tap_reexports_the_table(self) -> None:
        """
        C{tap.options} (what twistd and L{tap.service} import) is the same table and
        class as L{hypervisor.options}.
        """
        import tap
        import tap.options
        from hypervisor import options

        self.assertIs(tap.options.Options, options.Options)
        self.assertIs(tap.Options, options.Options)
        self.assertIs(tap.options.PARAMETERS, options.PARAMETERS)
        self.assertEqual(tap.options.NOT_USED_YET, options.NOT_USED_YET)

    def test_go_flags_round_trip(self) -> None:
        """
        L{Options.go_flags} parses back to the same settings (used by C{run}).
        """
        o = self.parse(
            "-stateDir=/s",
            "-portNum=1",
            "-volumeDirectories=/a,/b",
            "-showVGA",
            "-lockCheckInterval=250ms",
            "-objectCacheSize=3",
        )
        again = self.parse(*o.go_flags())
        for name in PARAMETER_NAMES + BOOLEAN_NAMES:
            self.assertEqual(again[name], o[name], name)


class FlagHelperTests(SynchronousTestCase):
    """
    Tests for the pure helpers in L{hypervisor.flags}.
    """

    def test_durations(self) -> None:
        """
        Go durations and plain seconds parse; garbage and negatives do not.
        """
        self.assertEqual(flags.parse_duration("2s"), 2.0)
        self.assertEqual(flags.parse_duration("1m30s"), 90.0)
        self.assertEqual(flags.parse_duration("500ms"), 0.5)
        self.assertEqual(flags.parse_duration("1h"), 3600.0)
        self.assertEqual(flags.parse_duration("1.5"), 1.5)
        for bad in ("", "s", "2x", "2s3", "-1s", "-1"):
            self.assertRaises(ValueError, flags.parse_duration, bad)

    def test_sizes(self) -> None:
        """
        Byte counts with binary suffixes parse; garbage does not.
        """
        self.assertEqual(flags.parse_size("10G"), 10 * 1024**3)
        self.assertEqual(flags.parse_size("10GiB"), 10 * 1024**3)
        self.assertEqual(flags.parse_size("1k"), 1024)
        self.assertEqual(flags.parse_size("77"), 77)
        for bad in ("", "G", "1.5G", "-1", "1X"):
            self.assertRaises(ValueError, flags.parse_size, bad)

    @given(st.integers(min_value=0, max_value=2**50))
    def test_size_round_trip(self, size: int) -> None:
        """
        L{flags.format_size} output parses back to the same number.
        """
        self.assertEqual(flags.parse_size(flags.format_size(size)), size)

    @given(st.integers(min_value=0, max_value=10**6), st.sampled_from([1, 1000]))
    def test_duration_round_trip(self, n: int, scale: int) -> None:
        """
        L{flags.format_duration} output parses back to the same number of seconds.
        """
        seconds = n / scale
        self.assertAlmostEqual(
            flags.parse_duration(flags.format_duration(seconds)), seconds, places=6
        )

    def test_normalize_stops_at_subcommand(self) -> None:
        """
        Flag rewriting stops at the first non-flag argument, as Go's flag package does.
        """
        argv, bools = flags.normalize_argv(["-a", "1", "-b", "stop", "-a", "2"], ["a"], ["b"])
        self.assertEqual(argv, ["--a", "1", "stop", "-a", "2"])
        self.assertEqual(bools, [("b", True)])
