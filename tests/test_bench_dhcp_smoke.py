"""
C{bench/dhcp.py} keeps working as the server changes: its smoke mode (our daemon
only, a few static leases, one-second perfdhcp runs at low rates) in a private
network namespace, and its perfdhcp report parser and packet-capture latency reader
on made-up input. The real measurement beside Kea and dnsmasq stays in C{bench/}.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from bench import dhcp
from tests import netns, support

PERFDHCP_REPORT = """\
***Rate statistics***
Rate: 99.1773 4-way exchanges/second, expected rate: 100

***Statistics for: DISCOVER-OFFER***
sent packets: 300
received packets: 297
drops: 3
drops ratio: 1 %

***Statistics for: REQUEST-ACK***
sent packets: 297
received packets: 297
drops: 0
"""


def cells(table: str, label: str) -> list[str]:
    """
    The cells after C{label} of the one table row starting with it.
    """
    rows = [line for line in table.splitlines() if line.startswith(label + "  ")]
    if len(rows) != 1:
        raise AssertionError(f"expected one row {label!r} in:\n{table}")
    return rows[0][len(label) :].split()


def frame(xid: int, kind: int) -> bytes:
    """
    An Ethernet/IPv4/UDP frame carrying a DHCP message of type C{kind}.
    """
    bootp = struct.pack("!BBBBI", 1, 1, 6, 0, xid) + bytes(228) + b"\x63\x82\x53\x63"
    bootp += bytes((53, 1, kind, 255))
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0)
    ip = bytes((0x45,)) + bytes(19)
    return bytes(12) + b"\x08\x00" + ip + udp + bootp


class ParserTests(SynchronousTestCase):
    """
    The bench's readers on made-up input.
    """

    def test_perfdhcp_report(self) -> None:
        """
        Sent and received per exchange, drops over both, DORAs completed, the rate
        from ACKs over the period, and whether perfdhcp kept up.
        """
        result = dhcp.parse_perfdhcp(PERFDHCP_REPORT, 100, 3)
        self.assertEqual(result.sent, {"DO": 300, "RA": 297})
        self.assertEqual(result.received, {"DO": 297, "RA": 297})
        self.assertAlmostEqual(result.drops, 100 * 3 / 597)
        self.assertEqual(result.doras, 297)
        self.assertEqual(result.rate, 99)
        self.assertFalse(result.generator_bound)
        self.assertTrue(dhcp.parse_perfdhcp(PERFDHCP_REPORT, 1000, 3).generator_bound)

    def test_latencies_from_pcap(self) -> None:
        """
        DISCOVER->OFFER and REQUEST->ACK matched by xid and type in a pcap file; an
        unanswered request and a stray reply count for nothing.
        """
        records = [
            (1.000, frame(7, 1)),  # DISCOVER
            (1.002, frame(7, 2)),  # OFFER: 2 ms
            (1.010, frame(7, 3)),  # REQUEST
            (1.015, frame(7, 5)),  # ACK: 5 ms
            (1.020, frame(8, 1)),  # unanswered
            (1.030, frame(9, 5)),  # stray ACK
        ]
        path = os.path.join(tempfile.mkdtemp(), "x.pcap")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
            for stamp, data in records:
                seconds = int(stamp)
                micros = round((stamp - seconds) * 1e6)
                f.write(struct.pack("<IIII", seconds, micros, len(data), len(data)) + data)
        found = sorted(round(x * 1000, 3) for x in dhcp.latencies(path))
        self.assertEqual(found, [2.0, 5.0])

    def test_max_rate_search(self) -> None:
        """
        Doubling until drops reach 1 %, then bisection between the last good and
        the first bad rate.
        """

        def run(rate: int) -> dhcp.PerfResult:
            ok = rate <= 1300
            return dhcp.PerfResult(
                rate, 1.0, {"DO": rate, "RA": rate}, {"DO": rate, "RA": rate if ok else 0}
            )

        good, bad, steps = dhcp.find_max_rate(run, 500, 64000, 3)
        assert good is not None and bad is not None
        self.assertEqual([s.requested for s in steps], [500, 1000, 2000, 1500, 1250, 1375])
        self.assertEqual(good.requested, 1250)
        self.assertEqual(bad.requested, 1375)


class SmokeTests(SynchronousTestCase):
    """
    C{python -m bench.dhcp --servers ours} for a few seconds.
    """

    def test_smoke_run_prints_the_table(self) -> None:
        """
        Against our daemon only, with 20 leases and 1-second runs at 100 and 200
        DORA/s: exit 0 and a table with our column filled (a rate, latencies,
        drops under 1 % at 100/s, a CPU figure).
        """
        netns.require_world()
        for tool, package in (("perfdhcp", "kea-admin"), ("tcpdump", "tcpdump")):
            support.require(
                os.access(dhcp._tool(tool), os.X_OK), f"{tool} is not installed (Debian {package})"
            )
        result = subprocess.run(
            [sys.executable, "-m", "bench.dhcp", "--servers", "ours", "--leases", "20"]
            + ["--period", "1", "--latency-rate", "100", "--start-rate", "100"]
            + ["--max-rate", "200", "--bisections", "0", "--quiet"],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        table = result.stdout
        self.assertIn("ours", table.splitlines()[1])
        rate = cells(table, "DORA/s with drops < 1 %")[0]
        self.assertGreater(float(rate), 50, table)
        median = float(cells(table, "latency median at 100/s (ms)")[0])
        p99 = float(cells(table, "latency p99 at 100/s (ms)")[0])
        self.assertGreater(median, 0, table)
        self.assertGreaterEqual(p99, median, table)
        self.assertLess(float(cells(table, "drops at 100/s (%)")[0]), 1.0, table)
        self.assertGreater(float(cells(table, "server CPU us per DORA at 100/s")[0]), 0, table)
