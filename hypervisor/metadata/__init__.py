"""
The metadata server on 169.254.169.254: path tree (L{paths}), decisions
(L{backend}), HTTP (L{resource}), per-bridge namespaces (L{plumbing}), and the
named service C{metadata} (L{service}).
"""
