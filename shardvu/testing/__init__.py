"""A toolkit for testing any vhost-user back-end from Python.

Nothing here is needed to *run* a back-end: these are the pieces that play
the other side.

- :mod:`.frontend`: a vhost-user front-end (QEMU's role): connects to a
  back-end's socket, negotiates, shares guest memory, sets up rings.
- :mod:`.driver`: the guest driver's half of a split virtqueue (posting
  buffers, reaping used entries), over memory the front-end shares.
- :mod:`.runtime`: start and stop ``shardvu run`` as a subprocess.
- :mod:`.testpmd`: drive DPDK's ``dpdk-testpmd`` (virtio-user as the
  front-end, or its vhost PMD as the peer back-end).
- :mod:`.guest` / :mod:`.qemu`: build a small Linux guest and run it
  under QEMU against a vhost-user socket.

The front-end and driver work against any back-end (the tests drive DPDK's
vhost PMD with them too); ``shardvu bench`` uses them, so they ship in the
wheel.
"""
