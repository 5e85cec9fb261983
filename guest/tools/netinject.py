#!/usr/bin/env python3
"""Host side of guest/programs/virtio_net.c: raw Ethernet frames on a TAP (or any interface) through an
AF_PACKET socket. Run it as root inside the network namespace that holds the TAP:

    ip netns exec NS guest/tools/netinject.py stop tap0 [--dst MAC] [--repeat 3]
    ip netns exec NS guest/tools/netinject.py rx tap0 N [--dst MAC] [--size L] [--pps R] [--no-stop]
    ip netns exec NS guest/tools/netinject.py count tap0 SECONDS [--idle S] [--expect N]

Test frames have ethertype 0x88B5 (IEEE local experimental). Payload of frame seq s: 4-byte little-endian s,
then byte i = (s + i) & 0xff for i >= 4 (i counted from the start of the payload). A STOP frame's payload starts
with the ASCII bytes "STOP" (zero-padded to the 60-byte minimum).

stop   sends a STOP frame (--repeat times, 50 ms apart: a guest that is busy may drop one).
rx     sends N test frames with seq 0..N-1; the Ethernet length (no FCS) is --size, or by default mixed over
       60..1514 (60 + (s * 389) % 1455, so the first frames are 60, 449, 838, ...); --pps paces them (default:
       as fast as the socket takes them, waiting when the TAP's queue is full); then STOP frames unless --no-stop.
       Prints `SENT frames=N bytes=B seconds=T`.
count  counts frames the guest sends for SECONDS (or until --idle S without a frame once one arrived, or
       --expect N test frames): test frames (0x88B5: frames, bytes, sequence gaps), IPv4/TCP frames (bytes,
       GSO frames from the virtio_net_hdr the socket reports with PACKET_VNET_HDR, and whether the TCP checksum
       field holds the pseudo-header sum, as CHECKSUM_PARTIAL frames must), plus the socket's drop counter and
       the interface's rx counters (what the TAP took from the VMM, including frames the socket dropped).
       Prints one line `COUNT key=value ...`.
"""
import argparse, os, socket, struct, sys, time

ETH_P_ALL = 0x0003
ETH_TEST = 0x88B5
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
BCAST = b"\xff" * 6


def mac_bytes(text):
    parts = text.split(":")
    if len(parts) != 6:
        raise argparse.ArgumentTypeError(f"bad MAC {text!r}")
    return bytes(int(p, 16) for p in parts)


def if_mac(iface):
    with open(f"/sys/class/net/{iface}/address") as f:
        return mac_bytes(f.read().strip())


def if_stats(iface):
    out = {}
    for k in ("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes", "tx_dropped"):
        try:
            with open(f"/sys/class/net/{iface}/statistics/{k}") as f:
                out[k] = int(f.read())
        except OSError:
            out[k] = -1
    return out


def open_socket(iface, proto=ETH_P_ALL):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    s.bind((iface, proto))
    return s


def stop_frame(src, dst):
    return (dst + src + struct.pack("!H", ETH_TEST) + b"STOP").ljust(60, b"\0")


PATTERN = bytes(range(256)) * 8


def test_frame(header, seq, length):
    """Ethernet frame of `length` bytes: header (14 bytes), seq (LE), then (seq + i) & 0xff for i >= 4."""
    start = (seq + 4) & 0xFF
    return header + struct.pack("<I", seq & 0xFFFFFFFF) + PATTERN[start:start + length - 18]


def send_stop(s, src, dst, repeat):
    for i in range(repeat):
        if i:
            time.sleep(0.05)
        s.send(stop_frame(src, dst))


def cmd_stop(a):
    s = open_socket(a.iface)
    send_stop(s, if_mac(a.iface), a.dst, a.repeat)
    print(f"STOP sent to {a.dst.hex(':')} on {a.iface} ({a.repeat}x)")


def cmd_rx(a):
    s = open_socket(a.iface)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
    except OSError:
        pass
    src = if_mac(a.iface)
    header = a.dst + src + struct.pack("!H", ETH_TEST)
    if a.size and not 60 <= a.size <= 1514:
        sys.exit("--size must be 60..1514")
    interval = 1.0 / a.pps if a.pps else 0.0
    t0 = time.monotonic()
    nbytes = 0
    for seq in range(a.n):
        length = a.size or 60 + (seq * 389) % 1455
        frame = test_frame(header, seq, length)
        if interval:
            due = t0 + seq * interval
            while True:
                now = time.monotonic()
                if now >= due:
                    break
                if due - now > 0.002:
                    time.sleep(due - now - 0.001)
        while True:
            try:
                s.send(frame)
                break
            except OSError as e:                       # ENOBUFS: the TAP's queue is full, retry
                if e.errno not in (105, 11):
                    raise
                time.sleep(0.0002)
        nbytes += length
    t1 = time.monotonic()
    print(f"SENT frames={a.n} bytes={nbytes} seconds={t1 - t0:.3f}", flush=True)
    if not a.no_stop:
        time.sleep(a.stop_delay)
        send_stop(s, src, a.dst, a.repeat)


def pseudo_sum_ok(pkt, ip_off):
    """(is IPv4/TCP, TCP checksum field == folded pseudo-header sum over the full TCP length)."""
    ihl = (pkt[ip_off] & 15) * 4
    total = struct.unpack_from("!H", pkt, ip_off + 2)[0]
    tcp_len = total - ihl
    src, dst = bytes(pkt[ip_off + 12:ip_off + 16]), bytes(pkt[ip_off + 16:ip_off + 20])
    s = sum(struct.unpack("!4H", src + dst)) + 6 + tcp_len
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    field = struct.unpack_from("!H", pkt, ip_off + ihl + 16)[0]
    return field == s


def cmd_count(a):
    s = open_socket(a.iface)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)      # reset the counters
    s.settimeout(0.2)
    before = if_stats(a.iface)
    buf = bytearray(70000)
    view = memoryview(buf)
    c = dict(frames=0, bytes=0, lost=0, back=0, tcp_frames=0, tcp_bytes=0, gso=0, gso_bad=0, csum_partial=0,
             pseudo_ok=0, pseudo_bad=0, other=0)
    next_seq = 0
    t_start = time.monotonic()
    t_first = t_last = None
    deadline = t_start + a.seconds
    print("COUNT-READY", flush=True)
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if a.idle and t_last is not None and now - t_last > a.idle:
            break
        if a.expect and c["frames"] >= a.expect:
            break
        try:
            n, addr = s.recvfrom_into(buf)
        except socket.timeout:
            continue
        if addr[2] == PACKET_OUTGOING:                  # sent by this host, not by the guest
            continue
        hdr = view[:10]
        pkt = view[10:n]
        if len(pkt) < 14:
            continue
        etype = (pkt[12] << 8) | pkt[13]
        t_last = time.monotonic()
        if etype == ETH_TEST:
            if bytes(pkt[14:18]) == b"STOP":
                continue
            if t_first is None:
                t_first = t_last
            seq = struct.unpack_from("<I", pkt, 14)[0]
            if seq < next_seq:
                c["back"] += 1
            else:
                c["lost"] += seq - next_seq
                next_seq = seq + 1
            c["frames"] += 1
            c["bytes"] += len(pkt)
        elif etype == 0x0800 and len(pkt) >= 54 and pkt[14 + 9] == 6:
            if t_first is None:
                t_first = t_last
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("<BBHHHH", hdr)
            c["tcp_frames"] += 1
            c["tcp_bytes"] += len(pkt)
            if gso_type:
                c["gso"] += 1
                if gso_type != 1 or not gso_size:
                    c["gso_bad"] += 1
            if flags & 1:
                c["csum_partial"] += 1
                if csum_start == 34 and csum_offset == 16 and pseudo_sum_ok(pkt, 14):
                    c["pseudo_ok"] += 1
                else:
                    c["pseudo_bad"] += 1
            if c["tcp_frames"] == 1:
                c["first_gso"] = f"{flags}/{gso_type}/{hdr_len}/{gso_size}/{csum_start}/{csum_offset}"
        else:
            c["other"] += 1
    packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    after = if_stats(a.iface)
    span = (t_last - t_first) if t_first is not None and t_last is not None else 0.0
    c["socket_drops"] = drops
    c["if_rx_packets"] = after["rx_packets"] - before["rx_packets"]
    c["if_rx_bytes"] = after["rx_bytes"] - before["rx_bytes"]
    c["if_rx_dropped"] = after["rx_dropped"] - before["rx_dropped"]
    c["span_s"] = f"{span:.3f}"
    if span > 0:
        c["mbit_s"] = f"{(c['bytes'] + c['tcp_bytes']) * 8 / span / 1e6:.1f}"
        c["kpps"] = f"{(c['frames'] + c['tcp_frames']) / span / 1e3:.1f}"
    print("COUNT " + " ".join(f"{k}={v}" for k, v in c.items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stop", help="send a STOP frame")
    p.add_argument("iface")
    p.add_argument("--dst", type=mac_bytes, default=BCAST)
    p.add_argument("--repeat", type=int, default=1)
    p = sub.add_parser("rx", help="send N test frames, then STOP")
    p.add_argument("iface")
    p.add_argument("n", type=int)
    p.add_argument("--dst", type=mac_bytes, default=BCAST)
    p.add_argument("--size", type=int, default=0, help="Ethernet length 60..1514 (default: mixed)")
    p.add_argument("--pps", type=float, default=0, help="frames per second (default: unpaced)")
    p.add_argument("--no-stop", action="store_true")
    p.add_argument("--stop-delay", type=float, default=0.2, help="seconds before the STOP frames")
    p.add_argument("--repeat", type=int, default=3, help="STOP frames to send")
    p = sub.add_parser("count", help="count frames arriving from the guest")
    p.add_argument("iface")
    p.add_argument("seconds", type=float)
    p.add_argument("--idle", type=float, default=0, help="stop after this many seconds without a frame")
    p.add_argument("--expect", type=int, default=0, help="stop after this many test frames")
    a = ap.parse_args()
    {"stop": cmd_stop, "rx": cmd_rx, "count": cmd_count}[a.cmd](a)


if __name__ == "__main__":
    main()
