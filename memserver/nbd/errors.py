"""Errors of the NBD layer, split by what the caller must do about them."""

from __future__ import annotations


class NBDError(Exception):
    """Base of every error raised by the NBD protocol layer."""


class ProtocolError(NBDError):
    """The peer broke the protocol: drop this connection and nothing else."""


class OptionError(NBDError):
    """Refuse one handshake option with ``reply`` (a ``REP_ERR_*``) and go on."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message
