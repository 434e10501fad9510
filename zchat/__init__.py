"""zchat: a secure multi-user command-line chat on ZeroMQ."""

__version__ = "0.1.0"
