"""IMAP4rev1 server for the quarantine store (proto: wire format; message, search:
FETCH and SEARCH pieces; session: command semantics; server: the asyncio listener)."""

from relay.quarantine.imap.server import IMAPServer, start_imap

__all__ = ["IMAPServer", "start_imap"]
