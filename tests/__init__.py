"""
Tests for smallstack-hypervisor (trial; also runnable by pytest).
"""
