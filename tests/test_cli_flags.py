"""
vm-control and hyper-control against the Go tools' own C{-h} output
(C{../shared/reference/go-tools-help/}, copied in C{tests/data/go-tools-help}): the
same flags (name, type, default, text),
the same commands, Go's layout; read from those files here, so that drift fails.
"""

from __future__ import annotations

import io
import os
import re
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.api import METHODS
from hypervisor.cli import goflags, hyper_control, tool, vm_control
from hypervisor.pb.admin import ACTIONS as ADMIN_ACTIONS
from tests.support import REPO

SHARED = os.path.join(os.path.dirname(REPO), "shared", "reference", "go-tools-help")
LOCAL = os.path.join(REPO, "tests", "data", "go-tools-help")
# The copy in the tests (a clean clone has no ../shared), or the shared reference.
HELP_DIR = LOCAL if os.path.isdir(LOCAL) else SHARED
HOME = os.path.expanduser("~")


def go_help(program: str) -> str:
    """
    The Go tool's -h text, without the file's title line.
    """
    with open(os.path.join(HELP_DIR, f"{program}.txt")) as f:
        lines = f.read().splitlines()
    return "\n".join(line for line in lines if not line.startswith("### ")).rstrip("\n")


def _is_default(kind: str, text: str) -> bool:
    """
    Whether C{(default text)} at the end of a usage line is Go's default (and not
    part of the usage text, as C{-vCPUs}' "(default rounds up milliCPUs)").
    """
    if kind in ("uint", "int"):
        return re.fullmatch(r"-?\d+", text) is not None
    if kind == "string":
        return text.startswith('"')
    if kind == "duration":
        return re.fullmatch(r"[\dhms.]+", text) is not None
    if kind == "bool":
        return text in ("true", "false")
    return True


def parse_help(text: str) -> tuple[dict[str, tuple[str, str, str]], list[str]]:
    """
    Go's -h: flags (name -> (type, usage, default text)) and command synopses.
    """
    flags: dict[str, tuple[str, str, str]] = {}
    commands: list[str] = []
    lines = text.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith(" "):
            section = line
            i += 1
            continue
        if section == "Common flags:" and line.startswith("  -"):
            name, _, kind = line[3:].partition(" ")
            usage = lines[i + 1].removeprefix("    \t")
            default = ""
            m = re.search(r" \(default (.*)\)$", usage)
            if m and _is_default(kind or "bool", m.group(1)):
                usage, default = usage[: m.start()], m.group(1)
            flags[name] = (kind or "bool", usage, default)
            i += 2
            continue
        if section == "Commands:":
            commands.append(line.strip())
        i += 1
    return flags, commands


def our_help(module) -> str:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        code = module.main(["-h"])
    assert code == 0
    text = out.getvalue().replace(HOME, "$HOME")
    return re.sub(r"@SRPC\.\d+", "@SRPC.<pid>", text)


def go_part(text: str) -> str:
    """
    Our -h up to where our own sections start.
    """
    return text.split("\nFlags of this ", 1)[0].rstrip("\n")


def newer_go_vm_control_commands() -> set[str]:
    """
    The vm-control commands of later Go versions, from the reference's section 13.
    """
    with open(os.path.join(HELP_DIR, "vm-control-later-commands.txt")) as f:
        section = f.read()
    return set(re.findall(r"\b([a-z]+(?:-[a-z]+)+)\b", section))


TOOLS = [("vm-control", vm_control), ("hyper-control", hyper_control)]


class GoHelpTests(SynchronousTestCase):
    """
    The Go part of our -h is the Go tool's -h, line for line.
    """

    def test_help_is_go_help(self) -> None:
        """
        Flags (sorted, C{-name type}, tab-indented usage, Go's default rule) and
        commands are printed exactly as the Go tool prints them.
        """
        for program, module in TOOLS:
            self.assertEqual(go_part(our_help(module)), go_help(program), program)

    def test_flag_tables(self) -> None:
        """
        Every Go flag is in our table with its type, usage and default; our extra
        flags are marked as ours; every default parses with the flag's parser.
        """
        for program, module in TOOLS:
            go_flags, _ = parse_help(go_help(program))
            ours = {f.name: f for f in module.FLAGS}
            self.assertEqual(
                {n for n, f in ours.items() if f.go}, set(go_flags), f"{program}: flag names"
            )
            for name, (kind, usage, default) in go_flags.items():
                flag = ours[name]
                self.assertEqual(flag.kind, kind, f"{program} -{name}")
                self.assertEqual(flag.usage, usage, f"{program} -{name}")
                shown = "" if flag.is_zero_default() else flag.default
                if flag.kind == "string" and shown:
                    shown = f'"{shown}"'
                shown = shown.replace(HOME, "$HOME")
                shown = re.sub(r"@SRPC\.\d+", "@SRPC.<pid>", shown)
                self.assertEqual(shown, default, f"{program} -{name}")
                flag.convert(flag.default)

    def test_counts(self) -> None:
        """
        The figures: vm-control has 70 Go flags (the issue says so), hyper-control 39.
        """
        self.assertEqual(len(parse_help(go_help("vm-control"))[0]), 70)
        self.assertEqual(len(parse_help(go_help("hyper-control"))[0]), 39)
        names = {f.name: f for f in vm_control.FLAGS}
        self.assertIn("vCPUs", names)
        self.assertNotIn("vcpus", names)
        self.assertEqual(names["milliCPUs"].convert(names["milliCPUs"].default), 250)

    def test_commands(self) -> None:
        """
        Every Go command is listed with Go's synopsis; each one we run has a runner,
        and its method is served by the daemon; the others are marked with a reason;
        vm-control's extra commands are later Go versions' commands.
        """
        for program, module in TOOLS:
            _, go_commands = parse_help(go_help(program))
            ours = [c.synopsis().strip() for c in module.COMMANDS if c.go]
            self.assertEqual(ours, go_commands, program)
            for command in module.COMMANDS:
                runnable = command.name in module.RUNNERS
                self.assertEqual(runnable, not command.unavailable, command.name)
                admin = getattr(module, "ADMIN_ACTIONS", {})  # the PB admin surface's
                if runnable and command.name in admin:
                    self.assertIn(admin[command.name], ADMIN_ACTIONS, command.name)
                elif runnable:
                    self.assertIn(module.METHODS[command.name], METHODS, command.name)
            self.assertEqual(
                set(module.METHODS) | set(getattr(module, "ADMIN_ACTIONS", {})),
                set(module.RUNNERS),
                program,
            )
            # A command refused as "not served" names its method, which is indeed not
            # served (when the daemon serves it, the command must get a runner).
            refused = {c.name for c in module.COMMANDS if c.unavailable == module.NOT_SERVED}
            self.assertEqual(refused, set(module.UNSERVED_METHODS), program)
            for name, method in module.UNSERVED_METHODS.items():
                self.assertNotIn(method, METHODS, f"{program} {name}: {method} is served now")
        newer = newer_go_vm_control_commands()
        for command in vm_control.COMMANDS:
            if not command.go:
                self.assertIn(command.name, newer)

    def test_unused_marks_match_the_code(self) -> None:
        """
        A flag marked unused is read by nothing in the tool; every other flag is read
        (by the tool's module or the shared L{tool}).
        """
        from hypervisor.cli import local, migrate

        shared = "".join(open(str(m.__file__)).read() for m in (tool, migrate, local))
        for program, module in TOOLS:
            source = open(str(module.__file__)).read()
            for flag in module.FLAGS:
                pattern = re.compile(rf'v(?:alues)?(?:\[|\.get\()"{flag.name}"')
                if flag.unused:
                    self.assertIsNone(pattern.search(source), f"{program} -{flag.name}")
                else:
                    self.assertTrue(
                        pattern.search(source) or pattern.search(shared),
                        f"{program}: nothing reads -{flag.name}; mark it unused",
                    )

    def test_help_lists_our_parts(self) -> None:
        """
        After Go's part: our flags, our commands, the commands not run here with
        their reason, and the flags accepted but unused.
        """
        text = our_help(vm_control)
        rest = text[len(go_part(text)) :]
        for words in (
            "-transport string",
            "-kernelURL string",
            "get-vm-infos",
            "patch-vm-image: this hypervisor does not serve its method",
            "-probeTimeout",
        ):
            self.assertIn(words, rest)


class ParserTests(SynchronousTestCase):
    """
    Go's flag rules.
    """

    def test_forms(self) -> None:
        """
        C{-f v}, C{-f=v}, C{--f v}; booleans alone or C{=false}; parsing stops at the
        command; values are converted by type.
        """
        p = goflags.parse(
            [
                "-memory",
                "512MiB",
                "--milliCPUs=500",
                "-doNotStart",
                "-destroyProtection=false",
                "-dhcpTimeout",
                "-1s",
                "-vmTags",
                "a=b,c=d",
                "create-vm",
            ],
            vm_control.FLAGS,
            vm_control.COMMANDS,
        )
        v = p.values
        self.assertEqual(
            (v["memory"], v["milliCPUs"], v["doNotStart"], v["destroyProtection"]),
            (512 << 20, 500, True, False),
        )
        self.assertEqual((v["dhcpTimeout"], v["vmTags"]), (-1.0, {"a": "b", "c": "d"}))
        assert p.command is not None
        self.assertEqual(p.command.name, "create-vm")
        self.assertEqual(
            p.given,
            {"memory", "milliCPUs", "doNotStart", "destroyProtection", "dhcpTimeout", "vmTags"},
        )

    def test_defaults_in_requests(self) -> None:
        """
        Go's defaults reach the CreateVm request: 1 GiB, 250 milliCPUs, 256 MiB free,
        roundup 2^28, 1 minute DHCP timeout (the image timeout goes with -imageName only,
        as Go's).
        """
        p = goflags.parse(["create-vm"], vm_control.FLAGS, vm_control.COMMANDS)
        r = vm_control.create_request(p.values)
        self.assertEqual(
            (r.VmInfo.MemoryInMiB, r.VmInfo.MilliCPUs, r.VmInfo.VirtualCPUs),
            (1024, 250, 0),
        )
        self.assertEqual((r.MinimumFreeBytes, r.RoundupPower), (256 << 20, 28))
        self.assertEqual((r.DhcpTimeout, r.ImageTimeout), (60.0, 0.0))
        p = goflags.parse(["-imageName", "x", "create-vm"], vm_control.FLAGS, vm_control.COMMANDS)
        self.assertEqual(vm_control.create_request(p.values).ImageTimeout, 60.0)

    def test_values(self) -> None:
        """
        Sizes, lists, durations, numbers as Go reads them; bad ones name the flag.
        """
        self.assertEqual(goflags.parse_uint("0x10"), 16)
        self.assertEqual(goflags.parse_uint("010"), 8)
        self.assertEqual(goflags.parse_duration("1m30s"), 90.0)
        self.assertEqual(goflags.parse_duration("0"), 0.0)
        self.assertEqual(goflags.format_size(1 << 30), "1GiB")
        self.assertEqual(goflags.parse_match_tags("a=1,a=2,b=3"), {"a": ["1", "2"], "b": ["3"]})
        self.assertEqual(
            hyper_control.parse_addresses("52:54:00:00:00:01;10.0.0.1"),
            [hyper_control.model.Address(IpAddress="10.0.0.1", MacAddress="52:54:00:00:00:01")],
        )
        for bad, words in [
            ("1.5s5", "invalid duration"),
            ("5", "invalid duration"),
        ]:
            self.assertRaisesRegex(ValueError, words, goflags.parse_duration, bad)
        for argv, words in [
            (["-externalLeaseAddresses", "10.0.0.1", "get-capacity"], "malformed address pair"),
            (["-externalLeaseAddresses", "aa;fe80::1", "get-capacity"], "address is not IPv4"),
            (["-maxUpdates", "many", "get-updates"], "-maxUpdates"),
            (["add-subnet", "a"], "command add-subnet takes ID IPgateway IPmask DNSserver..."),
        ]:
            with self.assertRaises(goflags.UsageError) as e:
                goflags.parse(argv, hyper_control.FLAGS, hyper_control.COMMANDS)
            self.assertIn(words, str(e.exception))
