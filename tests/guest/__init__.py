"""The tiny test guest (see build.py)."""
