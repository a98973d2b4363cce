"""fastgw.protocol.proxyproto against a small independent encoder (struct.pack / socket.inet_pton), fed whole and
byte by byte: every proper prefix of a valid header is "need more" and the first byte that makes a header
impossible raises at once."""
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw.protocol.proxyproto import (
    MAX_V1_HEADER,
    MAX_V2_HEADER,
    ProxyInfo,
    ProxyProtocolError,
    is_trusted,
    parse,
    parse_networks,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
HTTP = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


# ---- the reference encoder (written from the spec, shares no code with the parser) ----

def v1(proto, src="", dst="", sport="", dport=""):
    if proto == "UNKNOWN":
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def tlv(kind, value):
    return struct.pack("!BH", kind, len(value)) + value


def v2(cmd=1, fam_proto=0x11, src=None, dst=None, sport=0, dport=0, tlvs=b"", length=None, ver=2):
    if fam_proto >> 4 == 1:
        block = struct.pack("!4s4sHH", socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst),
                            sport, dport)
    elif fam_proto >> 4 == 2:
        block = struct.pack("!16s16sHH", socket.inet_pton(socket.AF_INET6, src),
                            socket.inet_pton(socket.AF_INET6, dst), sport, dport)
    elif fam_proto >> 4 == 3:
        block = struct.pack("!108s108s", b"/run/a.sock", b"/run/b.sock")
    else:
        block = b""
    block += tlvs
    n = len(block) if length is None else length
    return SIG + struct.pack("!BBH", (ver << 4) | cmd, fam_proto, n) + block


def aws_tlv(vpce):
    return tlv(0xEA, b"\x01" + vpce.encode())


# ---- feeding helpers ----

def check_valid(header, expected):
    """Whole, whole + application bytes, and every proper prefix (byte by byte)."""
    assert parse(header) == (len(header), expected)
    assert parse(header + HTTP) == (len(header), expected)
    assert parse(bytearray(header)) == (len(header), expected)
    for i in range(len(header)):
        assert parse(header[:i]) == (0, None), i


def check_error_at(data, pos, match=None):
    """Prefixes shorter than pos are incomplete; the prefix of length pos (and all longer) are refused."""
    for i in range(pos):
        assert parse(data[:i]) == (0, None), i
    for i in (pos, len(data)):
        with pytest.raises(ProxyProtocolError, match=match):
            parse(data[:i])


# ---- valid v1 ----

def test_v1_tcp4():
    check_valid(v1("TCP4", "192.0.2.10", "10.0.0.5", 56324, 8080),
                ProxyInfo(1, "PROXY", "TCP4", "192.0.2.10", 56324, "10.0.0.5", 8080))


def test_v1_tcp6_canonical_text():
    h = v1("TCP6", "2001:DB8:0:0:0:0:0:1", "::1", 0, 65535)
    check_valid(h, ProxyInfo(1, "PROXY", "TCP6", "2001:db8::1", 0, "::1", 65535))


def test_v1_unknown_keeps_peer_and_ignores_rest_of_line():
    check_valid(b"PROXY UNKNOWN\r\n", ProxyInfo(1, "PROXY", "UNKNOWN"))
    check_valid(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyInfo(1, "PROXY", "UNKNOWN"))


# The spec's worst case, exactly 107 bytes.
LONGEST_V1 = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"


def test_v1_longest_line_is_accepted():
    assert len(LONGEST_V1) == MAX_V1_HEADER
    check_valid(LONGEST_V1, ProxyInfo(1, "PROXY", "UNKNOWN"))
    h = v1("TCP6", "ffff:" * 7 + "ffff", "ffff:" * 7 + "ffff", 65535, 65535)
    check_valid(h, ProxyInfo(1, "PROXY", "TCP6", "ffff:" * 7 + "ffff", 65535, "ffff:" * 7 + "ffff", 65535))


# ---- valid v2 ----

def test_v2_ipv4():
    check_valid(v2(1, 0x11, "203.0.113.7", "10.1.2.3", 443, 8080),
                ProxyInfo(2, "PROXY", "TCP4", "203.0.113.7", 443, "10.1.2.3", 8080))


def test_v2_ipv6():
    check_valid(v2(1, 0x21, "2001:db8::7", "fd00::1", 65535, 1),
                ProxyInfo(2, "PROXY", "TCP6", "2001:db8::7", 65535, "fd00::1", 1))


def test_v2_local_discards_block():
    check_valid(v2(0, 0x00), ProxyInfo(2, "LOCAL", "UNSPEC"))
    # LOCAL with an address block (some senders fill it): still the real peer.
    check_valid(v2(0, 0x11, "1.2.3.4", "5.6.7.8", 1, 2), ProxyInfo(2, "LOCAL", "UNSPEC"))


def test_v2_unspec_udp_unix_keep_peer():
    check_valid(v2(1, 0x00), ProxyInfo(2, "PROXY", "UNSPEC"))
    check_valid(v2(1, 0x12, "1.2.3.4", "5.6.7.8", 1, 2), ProxyInfo(2, "PROXY", "UNSPEC"))
    check_valid(v2(1, 0x22, "::1", "::2", 1, 2), ProxyInfo(2, "PROXY", "UNSPEC"))
    check_valid(v2(1, 0x31), ProxyInfo(2, "PROXY", "UNSPEC"))


def test_v2_tlvs_are_skipped():
    tlvs = tlv(0x04, b"") + tlv(0x01, b"h2") + tlv(0x20, b"\x07" + b"\x00" * 4) + tlv(0x04, b"\x00" * 40)
    check_valid(v2(1, 0x11, "198.51.100.1", "10.0.0.1", 1234, 80, tlvs),
                ProxyInfo(2, "PROXY", "TCP4", "198.51.100.1", 1234, "10.0.0.1", 80))


def test_v2_aws_vpce_tlv():
    tlvs = tlv(0x04, b"\x00\x00") + aws_tlv("vpce-08d2bf15fac5001c9") + tlv(0x03, b"\x01\x02\x03\x04")
    check_valid(v2(1, 0x11, "172.31.7.113", "172.31.10.31", 40010, 8080, tlvs),
                ProxyInfo(2, "PROXY", "TCP4", "172.31.7.113", 40010, "172.31.10.31", 8080,
                          "vpce-08d2bf15fac5001c9"))
    # Other AWS subtypes are skipped, not mistaken for the endpoint id.
    _, info = parse(v2(1, 0x21, "::1", "::2", 1, 2, tlv(0xEA, b"\x02other")))
    assert info.aws_vpce_id is None


def test_v2_largest_header_is_accepted():
    room = MAX_V2_HEADER - 16 - 12 - 3
    h = v2(1, 0x11, "1.1.1.1", "2.2.2.2", 1, 2, tlv(0x04, b"\x00" * room))
    assert len(h) == MAX_V2_HEADER
    assert parse(h)[0] == MAX_V2_HEADER


# ---- malformed: refused at the first byte that decides it ----

@pytest.mark.parametrize("data", [b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"p", b" ", b"\x00"])
def test_no_header_refused_on_first_byte(data):
    with pytest.raises(ProxyProtocolError):
        parse(data)


def test_empty_is_incomplete():
    assert parse(b"") == (0, None)


def test_v1_bad_signature():
    check_error_at(b"PROXZ TCP4 1.1.1.1 2.2.2.2 1 2\r\n", 5, "signature")
    check_error_at(b"PROXYTCP4\r\n", 6, "signature")


def test_v2_bad_signature():
    good = v2(1, 0x11, "1.1.1.1", "2.2.2.2", 1, 2)
    for pos in range(1, 12):
        bad = good[:pos] + bytes([good[pos] ^ 0x40]) + good[pos + 1:]
        check_error_at(bad, pos + 1, "signature")


@pytest.mark.parametrize("ver", [0, 1, 3, 15])
def test_v2_wrong_version(ver):
    check_error_at(v2(1, 0x11, "1.1.1.1", "2.2.2.2", 1, 2, ver=ver), 13, "version")


@pytest.mark.parametrize("cmd", [2, 3, 15])
def test_v2_bad_command(cmd):
    check_error_at(v2(cmd, 0x11, "1.1.1.1", "2.2.2.2", 1, 2), 13, "command")


@pytest.mark.parametrize("fam_proto", [0x01, 0x10, 0x13, 0x23, 0x41, 0xF1, 0x02])
def test_v2_bad_family(fam_proto):
    h = SIG + bytes([0x21, fam_proto]) + struct.pack("!H", 12) + b"\x00" * 12
    check_error_at(h, 14, "family")


def test_v2_length_overflow():
    h = SIG + b"\x21\x11" + struct.pack("!H", MAX_V2_HEADER - 15) + b"\x00" * (MAX_V2_HEADER - 15)
    check_error_at(h, 16, "limit")
    h = SIG + b"\x21\x11\xff\xff"
    check_error_at(h, 16, "limit")


def test_v2_length_too_short_for_family():
    check_error_at(v2(1, 0x11, "1.1.1.1", "2.2.2.2", 1, 2, length=11), 16, "too short")
    check_error_at(v2(1, 0x21, "::1", "::2", 1, 2, length=12), 16, "too short")
    check_error_at(v2(1, 0x31, length=215), 16, "too short")


def test_v2_truncated_waits_then_completes():
    h = v2(1, 0x11, "1.1.1.1", "2.2.2.2", 1, 2, aws_tlv("vpce-1"))
    assert parse(h[:-1]) == (0, None)
    assert parse(h)[0] == len(h)


def test_v2_tlv_overrun_and_truncated_tlv():
    # A TLV that claims more than the header holds.
    block_tlv = struct.pack("!BH", 0x04, 10) + b"\x00" * 4
    h = v2(1, 0x11, "1.1.1.1", "2.2.2.2", 1, 2, block_tlv)
    check_error_at(h, len(h), "overruns")
    # Two stray bytes: too short to be a TLV.
    h = v2(1, 0x11, "1.1.1.1", "2.2.2.2", 1, 2, b"\x04\x00")
    check_error_at(h, len(h), "truncated")


def test_v2_aws_vpce_not_ascii():
    with pytest.raises(ProxyProtocolError, match="ASCII"):
        parse(v2(1, 0x11, "1.1.1.1", "2.2.2.2", 1, 2, tlv(0xEA, b"\x01vpce-\xff")))


def test_v1_too_long():
    data = b"PROXY TCP4 " + b"1" * 200
    check_error_at(data, MAX_V1_HEADER, "longer")
    # The CRLF one byte past the limit is too late.
    long = LONGEST_V1[:-2] + b"5\r\n"
    check_error_at(long, MAX_V1_HEADER, "longer")


def test_v1_bad_characters_fail_fast():
    check_error_at(b"PROXY TCP4 1.1.1.1\n", 19, "character")  # bare LF
    check_error_at(b"PROXY TCP4 1.1.1.1\rX", 20, "character")  # CR not followed by LF
    check_error_at(b"PROXY TCP4 \x00", 12, "character")
    check_error_at(b"PROXY TCP4 \xc3\xa9", 12, "character")


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 256.1.1.1 1.1.1.1 1 2\r\n",
    b"PROXY TCP4 1.2.3 1.1.1.1 1 2\r\n",
    b"PROXY TCP4 01.2.3.4 1.1.1.1 1 2\r\n",
    b"PROXY TCP4 ::1 1.1.1.1 1 2\r\n",
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY TCP6 ::g ::1 1 2\r\n",
    b"PROXY TCP4  1.1.1.1 1.1.1.1 1 2\r\n",
])
def test_v1_bad_address(line):
    with pytest.raises(ProxyProtocolError, match="address|fields"):
        parse(line)
    assert all(parse(line[:i]) == (0, None) for i in range(len(line) - 1))


@pytest.mark.parametrize("port", ["65536", "-1", "+80", "080", "00", "", "8a", "99999", "123456", " 80"])
def test_v1_bad_port(port):
    line = f"PROXY TCP4 1.1.1.1 2.2.2.2 {port} 80\r\n".encode()
    with pytest.raises(ProxyProtocolError, match="port|fields"):
        parse(line)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.1.1.1 2.2.2.2 1\r\n",
    b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2 3\r\n",
    b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2 \r\n",
    b"PROXY tcp4 1.1.1.1 2.2.2.2 1 2\r\n",
    b"PROXY UDP4 1.1.1.1 2.2.2.2 1 2\r\n",
    b"PROXY \r\n",
    b"PROXY UNKNOWNX\r\n",
])
def test_v1_bad_fields(line):
    with pytest.raises(ProxyProtocolError):
        parse(line)


# ---- round trips against the reference encoder (hypothesis) ----

ports = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=4), st.ip_addresses(v=4), ports, ports)
def test_roundtrip_v4(src, dst, sp, dp):
    expect1 = ProxyInfo(1, "PROXY", "TCP4", str(src), sp, str(dst), dp)
    check_valid(v1("TCP4", src, dst, sp, dp), expect1)
    check_valid(v2(1, 0x11, str(src), str(dst), sp, dp), expect1._replace(version=2))


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=6), st.ip_addresses(v=6), ports, ports, st.booleans(),
       st.one_of(st.none(), st.from_regex(r"vpce-[0-9a-f]{8,17}", fullmatch=True)))
def test_roundtrip_v6(src, dst, sp, dp, exploded, vpce):
    text = (lambda a: a.exploded) if exploded else str
    # The canonical text is the kernel's (inet_ntop), the one a direct peer's address has; same address.
    canon = lambda a: socket.inet_ntop(socket.AF_INET6, a.packed)  # noqa: E731
    expect1 = ProxyInfo(1, "PROXY", "TCP6", canon(src), sp, canon(dst), dp)
    assert ipaddress.ip_address(expect1.src_addr) == src
    check_valid(v1("TCP6", text(src), text(dst), sp, dp), expect1)
    tlvs = aws_tlv(vpce) if vpce else b""
    check_valid(v2(1, 0x21, str(src), str(dst), sp, dp, tlvs), expect1._replace(version=2, aws_vpce_id=vpce))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"PROXY ", SIG, SIG + b"\x21\x11", SIG + b"\x20\x00"]), st.binary(max_size=80))
def test_fuzz_prefix_decisions_are_final(prefix, tail):
    """On arbitrary bytes: only ProxyProtocolError is raised; once a prefix is refused or complete, every
    longer buffer gets the same answer (no flip-flopping as bytes arrive)."""
    data = prefix + tail
    decided = None
    for i in range(len(data) + 1):
        try:
            res = parse(data[:i])
        except ProxyProtocolError:
            res = "error"
        if decided is not None:
            assert res == decided, (data, i)
        elif res != (0, None):
            decided = res
            if res != "error":
                assert 0 < res[0] <= i and res[0] <= MAX_V2_HEADER


# ---- trusted networks ----

def test_parse_networks():
    nets = parse_networks(["10.0.0.0/8", "127.0.0.1", "::1", " fd00::/8 "])
    assert nets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"),
                    ipaddress.ip_network("::1/128"), ipaddress.ip_network("fd00::/8"))
    assert parse_networks([]) == ()


@pytest.mark.parametrize("bad", [["10.0.0.1/8"], ["nonsense"], ["10.0.0.0/33"], "10.0.0.0/8"])
def test_parse_networks_refuses(bad):
    with pytest.raises(ValueError):
        parse_networks(bad)


def test_is_trusted():
    nets = parse_networks(["10.0.0.0/8", "127.0.0.1", "fd00::/8"])
    assert is_trusted("10.200.3.4", nets)
    assert is_trusted("127.0.0.1", nets)
    assert is_trusted("fd12::5", nets)
    assert is_trusted("::ffff:10.0.0.9", nets)  # IPv4 peer on a dual-stack listener
    assert not is_trusted("11.0.0.1", nets)
    assert not is_trusted("127.0.0.2", nets)
    assert not is_trusted("::1", nets)
    assert not is_trusted("::ffff:11.0.0.9", nets)
    assert not is_trusted("not-an-ip", nets)
    assert not is_trusted("", nets)
    assert not is_trusted("10.0.0.1\x00", nets)
    assert not is_trusted(None, nets)
    assert not is_trusted("10.0.0.1", ())
    assert is_trusted("fd00::1%eth0", nets)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.lists(st.tuples(st.ip_addresses(), st.integers(0, 128)), max_size=4),
       st.booleans())
def test_is_trusted_matches_ipaddress(addr, specs, near):
    """Reference: ipaddress's own `in`, on random networks (some built around the address itself)."""
    nets = [ipaddress.ip_network(f"{a}/{min(p, a.max_prefixlen)}", strict=False) for a, p in specs]
    if near and specs:
        nets.append(ipaddress.ip_network(f"{addr}/{min(specs[0][1], addr.max_prefixlen)}", strict=False))
    networks = parse_networks([str(n) for n in nets])
    # The one rule on top of ipaddress: an IPv4-mapped IPv6 peer is its IPv4 address.
    plain = addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr
    expected = any(plain in n for n in nets)
    assert is_trusted(str(addr), networks) == expected
    if addr.version == 4:  # the same peer seen on a dual-stack listener
        assert is_trusted(f"::ffff:{addr}", networks) == expected
