"""POP3 access to the quarantine: `proto` (sans-IO engine) and `server` (asyncio)."""
