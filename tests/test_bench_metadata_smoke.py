"""
bench/metadata.py's parsing of wrk's output (the benchmark itself needs a world, wrk
and nginx and is never run in CI).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from bench.metadata import parse_wrk, to_ms

WRK_OUTPUT = """Running 10s test @ http://169.254.169.254/openstack/latest/meta_data.json
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.80ms    4.01ms  60.12ms   80.00%
    Req/Sec     2.84k   312.00     3.50k    70.00%
  Latency Distribution
     50%    8.44ms
     75%   10.10ms
     90%   13.00ms
     99%   23.80ms
  56570 requests in 10.00s, 30.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   5657.00
Transfer/sec:      3.00MB
"""


class ParseTests(SynchronousTestCase):
    """
    wrk's figures.
    """

    def test_parse(self) -> None:
        """
        Requests/s, p50, p99, socket errors and non-2xx responses are read.
        """
        got = parse_wrk(WRK_OUTPUT)
        self.assertEqual(
            got, {"rps": 5657.0, "p50": 8.44, "p99": 23.8, "errors": 3.0, "non2xx": 4.0}
        )

    def test_units(self) -> None:
        """
        us, ms and s become milliseconds; garbage is NaN.
        """
        self.assertEqual(to_ms("812.00us"), 0.812)
        self.assertEqual(to_ms("2.5s"), 2500.0)
        self.assertNotEqual(to_ms("x"), to_ms("x"))
