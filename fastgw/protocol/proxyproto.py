"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt), sans-IO, plus the trusted-peer check.

A load balancer that speaks TCP (AWS NLB, HAProxy in tcp mode) puts one header in front of the client's bytes
saying who the client really is. This module only turns bytes into a `ProxyInfo`; the connection code buffers,
applies the timeout, and decides whether to believe it (`is_trusted`). A header is believed only from a peer in
`trusted_proxies`: anybody else could write any address into it.

Usage from the connection code:

    consumed, info = parse(buf)   # (0, None): need more bytes; raises ProxyProtocolError: refuse at once
    if info is not None:
        client = info.src_addr if info.src_addr is not None else peer_addr   # LOCAL / UNKNOWN keep the peer
        rest = buf[consumed:]                                               # the first bytes of HTTP

Decisions are made as early as the bytes allow, so a client that sends no header (or garbage) is refused on
its first byte instead of after a timeout, and nobody can make us buffer more than the spec's limits:
v1 is at most 107 bytes with its CRLF; v2 at most MAX_V2_HEADER bytes in all (see below).
"""
from __future__ import annotations

import ipaddress
import re
import socket
from typing import Iterable, NamedTuple, Optional, Tuple, Union

__all__ = [
    "parse",
    "ProxyInfo",
    "ProxyProtocolError",
    "is_trusted",
    "parse_networks",
    "V2_SIGNATURE",
    "MAX_V1_HEADER",
    "MAX_V2_HEADER",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# v1: "the maximum line length is 107 bytes including the CRLF" (spec 2.1).
MAX_V1_HEADER = 107
# v2: the 16-bit length could announce 64 KiB; we accept what fits the minimal TCP MSS (536 bytes), the bound
# the spec gives senders so the whole header comes in one segment. Addresses (at most 216 bytes for UNIX)
# plus the TLVs real balancers send (AWS NLB: the VPC endpoint id, ~30 bytes) fit with room to spare.
MAX_V2_HEADER = 536

# v2 address block sizes by family nibble (spec 2.2): INET 4+4+2+2, INET6 16+16+2+2, UNIX 108+108.
_V2_ADDR_LEN = {0x1: 12, 0x2: 36, 0x3: 216}
PP2_TYPE_AWS = 0xEA
PP2_SUBTYPE_AWS_VPCE_ID = 0x01

# Bytes a v1 line may hold before its CRLF: printable ASCII (addresses, digits, words, single spaces).
# A CR is allowed only as the last byte seen so far (its LF may be in the next read).
_V1_BAD = re.compile(rb"[^\x20-\x7e]")
_V1_BAD_PARTIAL = re.compile(rb"[^\x20-\x7e](?!\Z)|[^\x20-\x7e\r]")
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY header; the connection must be closed."""


class ProxyInfo(NamedTuple):
    """What a PROXY header said.

    version: 1 or 2. command: "PROXY" (addresses apply) or "LOCAL" (v2 health check by the balancer itself:
    keep the real peer address). family: "TCP4", "TCP6", "UNKNOWN" (v1) or "UNSPEC" (v2; also v2 UDP/UNIX,
    which this TCP gateway does not use, so their addresses are ignored as the spec asks). Addresses and
    ports are None unless family is TCP4/TCP6. aws_vpce_id: the VPC endpoint id from AWS's TLV 0xEA, if sent.
    """

    version: int
    command: str
    family: str
    src_addr: Optional[str] = None
    src_port: Optional[int] = None
    dst_addr: Optional[str] = None
    dst_port: Optional[int] = None
    aws_vpce_id: Optional[str] = None


def parse(buf: bytes) -> Tuple[int, Optional[ProxyInfo]]:
    """Parse a PROXY header at the start of `buf`.

    Returns (0, None) while `buf` is a valid but incomplete prefix of a header, (consumed, ProxyInfo) once a
    whole header is there (the bytes after `consumed` belong to the application). Raises ProxyProtocolError
    as soon as `buf` cannot be the start of a valid header.
    """
    buf = bytes(buf) if not isinstance(buf, bytes) else buf
    if not buf:
        return 0, None
    first = buf[0]
    if first == 0x50:  # "P"
        return _parse_v1(buf)
    if first == 0x0D:  # "\r"
        return _parse_v2(buf)
    raise ProxyProtocolError("no PROXY protocol header (first byte %#04x)" % first)


def _parse_v1(buf: bytes) -> Tuple[int, Optional[ProxyInfo]]:
    n = len(V1_PREFIX)
    if buf[:n] != V1_PREFIX[: len(buf)]:
        raise ProxyProtocolError("bad PROXY v1 signature")
    end = buf.find(b"\r\n", 0, MAX_V1_HEADER)
    if end < 0:
        # Fail early on what can never become a valid line: a bare LF, a CR not followed by LF, binary bytes.
        if _V1_BAD_PARTIAL.search(buf, 0, MAX_V1_HEADER):
            raise ProxyProtocolError("bad character in PROXY v1 line")
        if len(buf) >= MAX_V1_HEADER:
            raise ProxyProtocolError("PROXY v1 line longer than %d bytes" % MAX_V1_HEADER)
        return 0, None
    line = buf[n:end]
    if _V1_BAD.search(line):
        raise ProxyProtocolError("bad character in PROXY v1 line")
    consumed = end + 2
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        # Spec: with UNKNOWN the receiver ignores the rest of the line and keeps the real endpoints.
        return consumed, ProxyInfo(1, "PROXY", "UNKNOWN")
    parts = line.split(b" ")
    if len(parts) != 5:
        raise ProxyProtocolError("PROXY v1 line must have 6 fields separated by single spaces")
    proto, src, dst, sport, dport = parts
    if proto == b"TCP4":
        family, af = "TCP4", socket.AF_INET
    elif proto == b"TCP6":
        family, af = "TCP6", socket.AF_INET6
    else:
        raise ProxyProtocolError("bad PROXY v1 protocol %r" % proto.decode("ascii"))
    return consumed, ProxyInfo(
        1, "PROXY", family, _v1_addr(src, af), _v1_port(sport), _v1_addr(dst, af), _v1_port(dport)
    )


def _v1_addr(raw: bytes, af: int) -> str:
    # inet_pton is strict (IPv4: exactly 4 decimal octets, no leading zeros; IPv6: no scope id) and
    # inet_ntop gives the same text the kernel reports for a direct peer, so one client has one spelling in
    # logs and rate-limit keys whether it came through the balancer or not.
    text = raw.decode("ascii")
    try:
        return socket.inet_ntop(af, socket.inet_pton(af, text))
    except (OSError, ValueError):
        raise ProxyProtocolError("bad PROXY v1 address %r" % text) from None


def _v1_port(raw: bytes) -> int:
    # Decimal 0..65535; no sign, no leading zeros (so each port has exactly one spelling).
    if not raw.isdigit() or (len(raw) > 1 and raw[0] == 0x30) or len(raw) > 5:
        raise ProxyProtocolError("bad PROXY v1 port %r" % raw.decode("ascii"))
    port = int(raw)
    if port > 65535:
        raise ProxyProtocolError("bad PROXY v1 port %r" % raw.decode("ascii"))
    return port


def _parse_v2(buf: bytes) -> Tuple[int, Optional[ProxyInfo]]:
    size = len(buf)
    if buf[:12] != V2_SIGNATURE[:size]:
        raise ProxyProtocolError("bad PROXY v2 signature")
    if size < 13:
        return 0, None
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("bad PROXY v2 version %d" % (ver_cmd >> 4))
    cmd = ver_cmd & 0x0F
    if cmd > 1:
        raise ProxyProtocolError("bad PROXY v2 command %d" % cmd)
    if size < 14:
        return 0, None
    fam_proto = buf[13]
    fam, proto = fam_proto >> 4, fam_proto & 0x0F
    if fam > 3 or proto > 2 or (fam == 0) != (proto == 0):
        # Spec: UNSPEC family goes with UNSPEC transport (0x00); any other nibble value is undefined.
        raise ProxyProtocolError("bad PROXY v2 family/protocol %#04x" % fam_proto)
    if size < 16:
        return 0, None
    length = (buf[14] << 8) | buf[15]
    total = 16 + length
    if total > MAX_V2_HEADER:
        raise ProxyProtocolError("PROXY v2 header of %d bytes is over the %d-byte limit" % (total, MAX_V2_HEADER))
    if cmd == 0:
        # LOCAL: the balancer's own connection (a health check). The spec says to discard the whole block,
        # family included, and keep the real endpoints; only the size bound above applies.
        return (total, ProxyInfo(2, "LOCAL", "UNSPEC")) if size >= total else (0, None)
    addr_len = _V2_ADDR_LEN.get(fam, 0)
    if length < addr_len:
        raise ProxyProtocolError("PROXY v2 length %d too short for its address family" % length)
    if size < total:
        return 0, None

    vpce = _v2_tlvs(buf, 16 + addr_len, total)
    if fam_proto == 0x11:
        a = 16
        return total, ProxyInfo(
            2, "PROXY", "TCP4",
            socket.inet_ntop(socket.AF_INET, buf[a : a + 4]), (buf[a + 8] << 8) | buf[a + 9],
            socket.inet_ntop(socket.AF_INET, buf[a + 4 : a + 8]), (buf[a + 10] << 8) | buf[a + 11],
            vpce,
        )
    if fam_proto == 0x21:
        a = 16
        return total, ProxyInfo(
            2, "PROXY", "TCP6",
            socket.inet_ntop(socket.AF_INET6, buf[a : a + 16]), (buf[a + 32] << 8) | buf[a + 33],
            socket.inet_ntop(socket.AF_INET6, buf[a + 16 : a + 32]), (buf[a + 34] << 8) | buf[a + 35],
            vpce,
        )
    # UNSPEC, UDP, UNIX: valid headers whose addresses a TCP listener cannot use; keep the real peer.
    return total, ProxyInfo(2, "PROXY", "UNSPEC", aws_vpce_id=vpce)


def _v2_tlvs(buf: bytes, pos: int, end: int) -> Optional[str]:
    """Walk the TLVs after the address block; each must fit exactly. Returns the AWS VPC endpoint id, if any."""
    vpce = None
    while pos < end:
        if end - pos < 3:
            raise ProxyProtocolError("truncated PROXY v2 TLV")
        kind = buf[pos]
        vlen = (buf[pos + 1] << 8) | buf[pos + 2]
        start = pos + 3
        pos = start + vlen
        if pos > end:
            raise ProxyProtocolError("PROXY v2 TLV overruns the header")
        if kind == PP2_TYPE_AWS and vlen >= 1 and buf[start] == PP2_SUBTYPE_AWS_VPCE_ID:
            try:
                vpce = buf[start + 1 : pos].decode("ascii")
            except UnicodeDecodeError:
                raise ProxyProtocolError("PROXY v2 AWS VPC endpoint id is not ASCII") from None
    return vpce


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(entries: Iterable[str]) -> Tuple[Network, ...]:
    """Turn config entries ("10.0.0.0/8", "127.0.0.1", "::1") into networks; a bare address is a /32 or /128.

    Raises ValueError naming the entry when one is not a network, or has host bits set ("10.0.0.1/8" is
    almost always a typo for something else, so it is refused rather than silently widened).
    """
    if isinstance(entries, (str, bytes)):
        raise ValueError("trusted networks must be a list of strings, not one string")
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(str(entry).strip(), strict=True))
        except ValueError as exc:
            raise ValueError("bad trusted network %r: %s" % (entry, exc)) from None
    return tuple(out)


def is_trusted(peer_ip: str, networks: Iterable[Network]) -> bool:
    """True when the connection's real peer address lies in one of `networks`.

    A dual-stack listener reports IPv4 peers as IPv4-mapped IPv6 ("::ffff:10.0.0.5"): those are compared as
    the IPv4 address they carry. Anything that is not an address is not trusted.
    """
    if not isinstance(peer_ip, str):
        return False
    try:
        packed, version = socket.inet_pton(socket.AF_INET, peer_ip), 4
    except OSError:
        try:
            packed, version = socket.inet_pton(socket.AF_INET6, peer_ip.split("%", 1)[0]), 6
        except (OSError, ValueError):
            return False
        if packed[:12] == _V4_MAPPED:
            packed, version = packed[12:], 4
    except ValueError:  # an embedded NUL
        return False
    ip = int.from_bytes(packed, "big")
    for net in networks:
        if net.version == version and ip & int(net.netmask) == int(net.network_address):
            return True
    return False
