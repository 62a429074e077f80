"""Reading the kernel's per-socket figures: /proc/net text → a route's drops and connections."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from proxyctl.traffic import RunningTotal, Tally, established, granted_receive_buffer, sockets, udp_drops

# As Linux prints them (x86-64): nginx on 127.0.0.1:8125 and [::1]:8125, a backend on 127.0.0.2:8125,
# and nginx's connected socket toward it from an ephemeral port.
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 3235: 0200007F:1FBD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2627847 2 00000000523a4994 5
 3235: 0100007F:1FBD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2627845 2 0000000032e5e656 17
 1012: 0100007F:C2EB 0200007F:1FBD 01 00000000:00000000 00:00000000 00000000     0        0 2627850 2 0000000032e5e657 3
"""
UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 3235: 00000000000000000000000001000000:1FBD 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2627846 2 0000000032667f48 4
"""
# A listener on 127.0.0.1:24224, one accepted connection, its client end, and a closing one.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   2: 0100007F:5EA0 00000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 2627848 2 00000000d20e4cf5 100 0 0 10 0
 249: 0100007F:5EA0 0100007F:9976 01 00000000:00000000 00:00000000 00000000     0        0 0 1 00000000ef0651cd 20 0 0 10 -1
 895: 0100007F:9976 0100007F:5EA0 01 00000000:00000000 00:00000000 00000000     0        0 2627849 2 000000008ed98e70 20 0 0 10 -1
1467: 0100007F:5EA0 0100007F:CC18 06 00000000:00000000 03:000011F0 00000000     0        0 0 3 0000000061fbd7a4
"""
LOOPBACKS = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def test_rows_are_read_with_their_addresses_ports_and_drops() -> None:
    rows = sockets(UDP) + sockets(UDP6)
    assert [(str(r.address), r.port, r.inode, r.drops) for r in rows] == [
        ("127.0.0.2", 8125, 2627847, 5), ("127.0.0.1", 8125, 2627845, 17), ("127.0.0.1", 49899, 2627850, 3),
        ("::1", 8125, 2627846, 4)]


def test_only_rows_on_the_ports_asked_for_are_read() -> None:
    assert [r.inode for r in sockets(UDP + UDP6.split("\n", 1)[1], {8125})] == [2627847, 2627845, 2627846]
    assert sockets(TCP, {1}) == []


def test_a_udp_route_counts_its_listening_sockets_only() -> None:
    rows = sockets(UDP) + sockets(UDP6)
    assert udp_drops(rows, LOOPBACKS, 8125) == {2627845: 17, 2627846: 4}  # not the backend's, not port 49899
    assert udp_drops(rows, [ipaddress.ip_address("0.0.0.0")], 8125) == {2627847: 5, 2627845: 17}
    assert udp_drops(rows, LOOPBACKS, 9999) == {}


def test_a_tcp_route_counts_connections_accepted_on_its_port() -> None:
    rows = sockets(TCP)
    assert established(rows, LOOPBACKS, 24224) == 1  # not the listener, the client end, nor TIME_WAIT
    assert established(rows, [ipaddress.ip_address("::")], 24224) == 0
    assert established(rows, LOOPBACKS, 0x9976) == 1  # the client end is local to its own port


def test_the_kernel_grants_twice_the_request_up_to_rmem_max() -> None:
    assert granted_receive_buffer(4 << 20, 212992) == 425984
    assert granted_receive_buffer(4 << 20, 16 << 20) == 8 << 20


def test_a_running_total_never_decreases_as_sockets_come_and_go() -> None:
    total = RunningTotal()
    assert total.update({1: 5, 2: 1}) == 6
    assert total.update({1: 8, 2: 1}) == 9
    assert total.update({}) == 9  # nginx died: its sockets are gone
    assert total.update({3: 2}) == 11  # its new socket starts from 0
    assert total.update({3: 1}) == 12  # a count that went down: the inode was reused by a new socket


@given(st.lists(st.sampled_from(UDP.splitlines()[1].split()), max_size=14), st.text(max_size=40))
def test_a_mangled_row_never_keeps_the_others_from_being_read(fields: list[str], junk: str) -> None:
    text = UDP6 + " ".join(fields) + junk.replace("\n", " ") + "\n"
    assert sockets(text)[0] == sockets(UDP6)[0]


@pytest.mark.parametrize("where", ["state dir on disk", "state dir on tmpfs"])
def test_a_tally_file_keeps_its_count_as_its_blocks_are_freed(where: str, tmp_path: Path) -> None:
    """nginx appends a byte per session (O_APPEND, as it opens logs); the count is the size, the blocks go."""
    directory = tmp_path
    if where == "state dir on tmpfs":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm here")
        directory = Path("/dev/shm") / f"proxyctl-test-{os.getpid()}"
        directory.mkdir(exist_ok=True)
    path = directory / "statsd.no-backend"
    tally = Tally()
    assert tally.count(path) == 0  # nothing counted yet: no file
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            total = 0
            for _ in range(3):
                os.write(fd, b"\n" * 100_000)
                total += 100_000
                tally.free(path)
                stat = path.stat()
                assert (stat.st_size, tally.count(path)) == (total, total)
                assert stat.st_blocks * 512 <= stat.st_blksize, stat  # only the block written to now
        finally:
            os.close(fd)
        path.unlink()  # gone, then made again from 0 (as if removed by hand): the counter goes on from 300,000
        assert tally.count(path) == total
        path.write_bytes(b"\n" * 5)
        assert tally.count(path) == total + 5
    finally:
        if where == "state dir on tmpfs":
            path.unlink(missing_ok=True)
            directory.rmdir()
