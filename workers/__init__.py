"""Data-plane worker processes (installed as shardvu.workers)."""
