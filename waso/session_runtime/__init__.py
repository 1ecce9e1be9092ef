"""The session runtime: one process per shard pod holding that shard's WhatsApp sockets."""
