"""
HTTP presentation: status pages (Klein + Jinja2). No logic lives here.
"""
