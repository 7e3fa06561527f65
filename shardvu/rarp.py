"""The RARP announcement a back-end sends for a guest after a migration
(vhost-user SEND_RARP), so that switches learn the guest's MAC address at
its new place: a broadcast RARP "request reverse" from the guest's MAC,
the frame DPDK's vhost library builds.  Built with dpkt (control process
only)."""
from __future__ import annotations

__all__ = ["rarp_frame", "check_mac", "format_mac"]

ETH_P_RARP = 0x8035
ARP_OP_REVREQUEST = 3


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def check_mac(mac: bytes) -> None:
    """Raise ValueError (one line) unless ``mac`` is a unicast MAC address
    a guest could have: 6 bytes, not all zero (the front-end sent none),
    not a group address."""
    if len(mac) != 6:
        raise ValueError(f"SEND_RARP: {len(mac)} bytes where a MAC address needs 6")
    if not any(mac):
        raise ValueError("SEND_RARP: no MAC address (00:00:00:00:00:00)")
    if mac[0] & 1:
        raise ValueError(f"SEND_RARP: {format_mac(mac)} is a group address, not a guest's MAC")


def rarp_frame(mac: bytes) -> bytes:
    """The 60-byte announcement frame for ``mac``: broadcast, EtherType
    RARP, op 3 (request reverse), sender and target hardware address
    ``mac``, protocol addresses 0.0.0.0, padded to the Ethernet minimum."""
    import dpkt
    check_mac(mac)
    arp = dpkt.arp.ARP(hrd=dpkt.arp.ARP_HRD_ETH, pro=dpkt.arp.ARP_PRO_IP, hln=6, pln=4,
                       op=ARP_OP_REVREQUEST, sha=mac, spa=bytes(4), tha=mac, tpa=bytes(4))
    frame = bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=mac, type=ETH_P_RARP, data=bytes(arp)))
    return frame + bytes(60 - len(frame))
