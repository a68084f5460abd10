"""natd: an XDP NAT gateway for Linux (see README.md)."""

__version__ = "0.1.0"
