"""A port for tests/test_ops_cli.py: loopback that logs each batch from the
worker, to show the workers use the shared log set-up."""
import logging

log = logging.getLogger("shardvu.tests.ops_port")


def logging_loopback(frames):
    log.warning("port got %d frame(s)", len(frames))
    return frames
