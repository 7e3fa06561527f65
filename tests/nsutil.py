"""Network namespaces for tests (see :mod:`shardvu.testing.netns`)."""
from shardvu.testing.netns import can_netns, netns, sh  # noqa: F401
