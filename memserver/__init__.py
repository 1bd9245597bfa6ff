"""rampool memserver: the daemon that lends a host's RAM to the pool over NBD."""

__version__ = "0.1.0"
