"""proxycore: the data plane. Pure asyncio, no Django: it consumes a Snapshot."""
