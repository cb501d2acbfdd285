"""What a hostile pod with CAP_NET_RAW can write: hand-made Ethernet frames on its own interface.

Run inside a namespace (`ip netns exec NS python rawpod.py ...`); standard library only.

    send  IFACE DST_MAC KIND [options]   one frame: tcp-syn, udp, a later fragment, a neighbour or router
                                         advertisement, an ICMP error about a UDP datagram; of the addresses'
                                         family; optionally VLAN-tagged, with IPv6 extension headers
    watch IFACE SECONDS MATCH            print "ready", then "seen" at the first frame that matches, or "none"
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import select
import socket
import struct
import sys
import time
from pathlib import Path

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(source: str, destination: str, protocol: int, payload: bytes, fragment_offset: int = 0) -> bytes:
    """`fragment_offset` (bytes, a multiple of 8): a later fragment, whose payload the receiver would put there."""
    addresses = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed
    flags = fragment_offset // 8 if fragment_offset else 0x4000  # a fragment, or don't-fragment
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 0x1234, flags, 64, protocol, 0) + addresses
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


# IPv6 extension headers by name (RFC 8200): hop-by-hop and destination options (8 bytes of Pad1), a routing
# header of type 0 with one segment left (its real destination is another than the one written), a fragment.
EXTENSIONS = {"hop": 0, "dst": 60, "routing": 43, "fragment": 44}


def extension(kind: str, next_header: int, fragment_offset: int) -> bytes:
    if kind == "routing":
        return struct.pack("!BBBB4x", next_header, 2, 0, 1) + ipaddress.IPv6Address("fd00:dead::1").packed
    if kind == "fragment":
        return struct.pack("!BBHI", next_header, 0, fragment_offset | (0 if fragment_offset else 1), 0x5678)
    return struct.pack("!BB6x", next_header, 0)


def ipv6(source: str, destination: str, protocol: int, payload: bytes, extensions: tuple[str, ...] = (),
         fragment_offset: int = 0) -> bytes:  # fmt: skip
    """`extensions` by name, in order; "fragment" with `fragment_offset` 0 is a first fragment (more follow)."""
    chain = b""
    next_headers = [EXTENSIONS[kind] for kind in extensions[1:]] + [protocol] if extensions else []
    for kind, next_header in zip(extensions, next_headers, strict=True):
        chain += extension(kind, next_header, fragment_offset)
    first = EXTENSIONS[extensions[0]] if extensions else protocol
    addresses = ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address(destination).packed
    return struct.pack("!IHBB", 6 << 28, len(chain) + len(payload), first, 255) + addresses + chain + payload


def ip_packet(source: str, destination: str, protocol: int, segment: bytes, checksum_at: int | None,
              extensions: tuple[str, ...] = (), fragment_offset: int = 0) -> tuple[bytes, int]:  # fmt: skip
    """The segment in an IP packet of the addresses' family, its checksum filled in; (packet, ethertype)."""
    if ":" in source:
        addresses = ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address(destination).packed
        pseudo = addresses + struct.pack("!IxxxB", len(segment), protocol)
        if checksum_at is not None:
            segment = l4_checksum(pseudo, segment, checksum_at)
        return ipv6(source, destination, protocol, segment, extensions, fragment_offset), ETH_P_IPV6
    pseudo = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed
    pseudo += struct.pack("!BBH", 0, protocol, len(segment))
    if protocol == ICMP:
        pseudo = b""  # ICMP for IPv4 sums its own message only
    if checksum_at is not None:
        segment = l4_checksum(pseudo, segment, checksum_at)
    return ipv4(source, destination, protocol, segment, fragment_offset), ETH_P_IP


def l4_checksum(pseudo: bytes, segment: bytes, offset: int) -> bytes:
    value = checksum(pseudo + segment)
    return segment[:offset] + struct.pack("!H", value) + segment[offset + 2 :]


def tcp_syn_segment(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)


def udp_segment(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


ICMP = 1
ICMPV6 = 58
NEIGHBOUR_ADVERTISEMENT = 136
ROUTER_ADVERTISEMENT = 134


def icmp_error_segment(source: str, inner_source: str, inner_destination: str, sport: int, dport: int) -> bytes:
    """Destination unreachable, port unreachable, carrying the start of a UDP datagram inner_source:sport ->
    inner_destination:dport (the datagram the error is about)."""
    inner, _ = ip_packet(inner_source, inner_destination, 17, udp_segment(sport, dport, b""), 6)
    if ":" in source:
        return struct.pack("!BBHI", 1, 4, 0, 0) + inner
    return struct.pack("!BBHI", 3, 3, 0, 0) + inner


def icmpv6_segment(kind: str, target: str) -> bytes:
    """A neighbour advertisement for `target` (solicited, override), or a router advertisement."""
    if kind == "neighbour-advert":
        return struct.pack("!BBHI", NEIGHBOUR_ADVERTISEMENT, 0, 0, 0x60000000) + ipaddress.IPv6Address(target).packed
    return struct.pack("!BBHBBHII", ROUTER_ADVERTISEMENT, 0, 0, 64, 0, 1800, 0, 0)


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def send(args: argparse.Namespace) -> None:
    own_mac = mac(Path(f"/sys/class/net/{args.iface}/address").read_text().strip())
    extensions = tuple(args.extension)
    if args.kind == "tcp-syn":
        segment, protocol, checksum_at = tcp_syn_segment(args.sport, args.dport), 6, 16
    elif args.kind == "udp":
        segment, protocol, checksum_at = udp_segment(args.sport, args.dport, args.payload.encode()), 17, 6
    elif args.kind == "fragment":
        # Bytes that look like a UDP header to whoever reads ports from a later fragment.
        segment, protocol, checksum_at = udp_segment(args.sport, args.dport, args.payload.encode()), 17, None
        if ":" in args.src:
            extensions += ("fragment",)
    elif args.kind == "icmp-error":
        segment = icmp_error_segment(args.src, args.inner_src, args.inner_dst, args.sport, args.dport)
        protocol, checksum_at = (ICMPV6 if ":" in args.src else ICMP), 2
    else:
        segment, protocol, checksum_at = icmpv6_segment(args.kind, args.target), ICMPV6, 2
    fragment_offset = 1480 if args.kind == "fragment" else 0
    packet, ethertype = ip_packet(args.src, args.dst, protocol, segment, checksum_at, extensions, fragment_offset)
    tags = b"".join(struct.pack("!HH", int(tpid, 16), int(vid)) for tpid, vid in (tag.split(":") for tag in args.vlan))
    if args.ethertype is not None:
        ethertype = int(args.ethertype, 16)  # the same bytes under another ethertype
    frame = mac(args.dst_mac) + own_mac + tags + struct.pack("!H", ethertype) + packet
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((args.iface, 0))
        for _ in range(args.count):
            try:
                raw.send(frame)
            except OSError as error:
                # A TC program on the way out (the to-pod direction) dropped it.
                if error.errno != errno.ENOBUFS:
                    raise


def frame_matches(frame: bytes, match: dict[str, str]) -> bool:
    """An untagged TCP/UDP frame of either family (IPv6 without extension headers) with the given addresses and
    ports; the family is the addresses'."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    family = match.get("family") or ("6" if ":" in match.get("src", "") + match.get("dst", "") else "4")
    if ethertype == ETH_P_IPV6 and family == "6":
        source, destination = frame[22:38], frame[38:54]
        l4, protocol = frame[54:], frame[20]
        source_text = str(ipaddress.IPv6Address(source))
        destination_text = str(ipaddress.IPv6Address(destination))
    elif ethertype == ETH_P_IP and family == "4":
        ihl = (frame[14] & 0x0F) * 4
        protocol = frame[23]
        source_text = socket.inet_ntoa(frame[26:30])
        destination_text = socket.inet_ntoa(frame[30:34])
        l4 = frame[14 + ihl :]
    else:
        return False
    if len(l4) < 4:
        return False
    sport, dport = struct.unpack("!HH", l4[:4])
    wanted = {
        "proto": {6: "tcp", 17: "udp"}.get(protocol, str(protocol)),
        "src": source_text,
        "dst": destination_text,
        "sport": str(sport),
        "dport": str(dport),
    }
    if "flags" in match and (wanted["proto"] != "tcp" or len(l4) < 14 or l4[13] & 0x3F != int(match["flags"], 16)):
        return False
    return all(wanted[key] == value for key, value in match.items() if key in wanted)


def watch(args: argparse.Namespace) -> None:
    match = dict(item.split("=", 1) for item in args.match)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as raw:
        raw.bind((args.iface, 0))
        print("ready", flush=True)
        deadline = time.monotonic() + args.seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([raw], [], [], left)[0]:
                break
            frame = raw.recv(65535)
            if frame_matches(frame, match):
                print("seen", flush=True)
                return
    print("none", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    sender = commands.add_parser("send")
    sender.add_argument("iface")
    sender.add_argument("dst_mac")
    sender.add_argument("kind", choices=("tcp-syn", "udp", "fragment", "neighbour-advert", "router-advert",
                                         "icmp-error"))  # fmt: skip
    sender.add_argument("--src", required=True)
    sender.add_argument("--dst", required=True)
    sender.add_argument("--sport", type=int, default=40000)
    sender.add_argument("--dport", type=int, default=0)
    sender.add_argument("--extension", action="append", default=[], choices=sorted(EXTENSIONS),
                        help="IPv6: an extension header before the upper-layer one, in order")  # fmt: skip
    sender.add_argument("--target", default="::", help="a neighbour advertisement's address")
    sender.add_argument("--inner-src", help="icmp-error: the source of the datagram it is about")
    sender.add_argument("--inner-dst", help="icmp-error: its destination (--sport, --dport: its ports)")
    sender.add_argument("--payload", default="hello\n")
    sender.add_argument("--vlan", action="append", default=[], help="TPID:VID, outermost first")
    sender.add_argument("--count", type=int, default=3)
    sender.add_argument("--ethertype", help="hex: write the packet under this ethertype instead")
    sender.set_defaults(run=send)
    watcher = commands.add_parser("watch")
    watcher.add_argument("iface")
    watcher.add_argument("seconds", type=float)
    watcher.add_argument("match", nargs="*", help="key=value: proto, src, dst, sport, dport, flags (hex), family")
    watcher.set_defaults(run=watch)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
