"""Control process of the sharded runtime (installed as shardvu.control)."""
