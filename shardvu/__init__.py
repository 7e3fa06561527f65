"""shardvu: a vhost-user back-end library in Python.

Modules:
  protocol   wire format and sans-IO message reader
  memory     guest memory regions and address translation
  virtqueue  the split virtqueue with libvhost-user's queue API
  device     the Device state machine (VuDev's counterpart)
  frontend   a Python front-end (QEMU's role), for tests and traffic
  runner     a single-process event loop over the socket and kick fds
"""
__version__ = "0.1.0"
