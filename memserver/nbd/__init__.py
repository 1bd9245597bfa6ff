"""The NBD protocol: constants (:mod:`.proto`), errors and the server state machine."""
