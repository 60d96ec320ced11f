# -*- test-case-name: tests.test_pages -*-
"""
The security headers every response of port 6976 carries (the Go hypervisor's).
"""

SECURITY_HEADERS = {
    b"X-Frame-Options": b"DENY",
    b"X-XSS-Protection": b"1",
    b"Content-Security-Policy": b"default-src 'self' ;style-src 'self' 'unsafe-inline'",
    b"X-Content-Type-Options": b"nosniff",
}
