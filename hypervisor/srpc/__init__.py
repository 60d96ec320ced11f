"""
SmallStack's SRPC on port 6976 (reference §12): what the unmodified Go C{vm-control},
C{hyper-control} and C{fleet-manager} speak, as a transport adapter over
L{hypervisor.dispatch.Dispatcher} (the same access decision, decoding, invocation and
error classification as the HTTPS JSON transport in L{web.rpc}).

- L{hypervisor.srpc.codec}: the wire without I/O: the CONNECT head and its replies,
  bounded line reading, the method-line answers, message encoding.
- L{hypervisor.srpc.protocol}: the Twisted protocols: L{ConnectRouter} (the first-line
  sniffer behind L{hypervisor.tls.SniffingFactory}: C{CONNECT} goes to SRPC, the rest
  to HTTP) and L{SrpcServer} (CONNECT, TLS on the same connection, the calls).
- L{hypervisor.srpc.client}: a blocking client that behaves as Go's does (endpoint
  order, a new TCP connection per try, TLS after CONNECT, per-call decoders), for the
  tests and for our command-line tools.
- L{hypervisor.srpc.routes}: the plain C{GET /_goSRPC_/...} side routes.
"""
