"""Bytes at rest, knowing no dataset kinds: local and object-store files, the store layout, the shard reader, the lock."""
