"""
libvirt: the connection service, its event thread and thread pool, domain helpers.
"""
