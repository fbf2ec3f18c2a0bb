"""The device side of ``jetyolo bench``: ``common`` (stdlib-only measuring helpers every child
shares) and ``worker`` (the ceiling and pipeline children, device code only)."""
