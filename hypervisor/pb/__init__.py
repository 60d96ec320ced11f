"""
Perspective Broker remote administration (TLS, client certificates): the server
(L{hypervisor.pb.server}), the runtime admin surface (L{hypervisor.pb.admin}) and
the wire conventions both ends share (L{hypervisor.pb.wire}).
"""
