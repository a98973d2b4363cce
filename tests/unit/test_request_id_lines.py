"""The request id a worker mints and the lines every response head gets, both written by hand in C (no
snprintf, no bytes % formatting), against their plain-Python formatting on many inputs."""
import random

from fastgw.proxy.relay import id_and_overhead_lines
from fastgw.proxy.gateway import request_id


def test_request_ids_are_the_prefix_and_the_counter_in_hex():
    rng = random.Random(1)
    counters = [0, 1, 9, 10, 15, 16, 255, 256, 2**32, 2**63, 2**64 - 1] + [rng.randrange(2**64) for _ in range(2000)]
    for prefix in (b"", b"req-1a2b3c4d-0-", b"req-1a2b3c4d-12-", b"w" * 48, b"x" * 49, b"y" * 200):
        for v in counters:
            assert request_id(prefix, v) == prefix.decode() + format(v, "x"), (prefix, v)


def test_id_and_overhead_lines_match_bytes_formatting():
    rng = random.Random(2)
    ids = [b"", b"rid-42", b"req-1a2b3c4d-0-1f", b"a" * 128] + [bytes(rng.choices(b"abc-._:@/+=9", k=rng.randrange(1, 129)))
                                                               for _ in range(200)]
    for rid in ids:
        for us in [0, 1, 9, 10, 999_999, 2**31, 2**63 - 1] + [rng.randrange(10**7) for _ in range(10)]:
            assert id_and_overhead_lines(rid, us) == b"x-request-id: %s\r\nx-fastgw-overhead-us: %d\r\n" % (rid, us)
        assert id_and_overhead_lines(rid, -5) == b"x-request-id: %s\r\nx-fastgw-overhead-us: 0\r\n" % rid  # clamped
