#!/usr/bin/env python3
"""A small Firecracker API client for the tests, written from Firecracker's API specification (swagger), using
only the standard library: HTTP/1.1 over the API's Unix socket.

    fcclient.py SOCKET KERNEL BOOT_ARGS SNAPSHOT_DIR

drives a VMM through the lifecycle a Firecracker user goes through: configure (boot-source, machine-config),
InstanceStart, describe, pause, snapshot/create, resume, then stop with SendCtrlAltDel. It prints one line per
step ("ok STEP" or "FAIL STEP: …") and exits 0 when every step gave the status the specification names.
"""
import http.client
import json
import os
import socket
import sys
import time


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket (Firecracker clients talk to `--api-sock` this way)."""

    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class Client:
    def __init__(self, path):
        self.path = path
        self.failures = 0

    def request(self, method, url, body=None):
        conn = UnixHTTPConnection(self.path)
        try:
            payload = None if body is None else json.dumps(body)
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, url, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, (json.loads(data) if data else None)
        finally:
            conn.close()

    def step(self, name, method, url, body=None, expect=204, check=None):
        status, reply = self.request(method, url, body)
        problem = None
        if status != expect:
            problem = "status %d, expected %d: %s" % (status, expect, reply)
        elif check is not None:
            problem = check(reply)
        if problem:
            self.failures += 1
            print("FAIL %s: %s" % (name, problem), flush=True)
        else:
            print("ok %s" % name, flush=True)
        return reply


def main():
    sock, kernel, boot_args, snapdir = sys.argv[1:5]
    c = Client(sock)
    c.step("describe-instance", "GET", "/", expect=200,
           check=lambda r: None if r.get("state") == "Not started" else "state %r" % r.get("state"))
    c.step("version", "GET", "/version", expect=200,
           check=lambda r: None if "firecracker_version" in r else "no firecracker_version")
    c.step("boot-source", "PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": boot_args})
    c.step("machine-config", "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    c.step("machine-config-get", "GET", "/machine-config", expect=200,
           check=lambda r: None if r.get("vcpu_count") == 1 and r.get("mem_size_mib") == 64 else "%r" % r)
    c.step("start", "PUT", "/actions", {"action_type": "InstanceStart"})
    c.step("running", "GET", "/", expect=200,
           check=lambda r: None if r.get("state") == "Running" else "state %r" % r.get("state"))
    time.sleep(0.5)
    c.step("pause", "PATCH", "/vm", {"state": "Paused"})
    c.step("paused", "GET", "/", expect=200,
           check=lambda r: None if r.get("state") == "Paused" else "state %r" % r.get("state"))
    snap, mem = os.path.join(snapdir, "vm.snap"), os.path.join(snapdir, "vm.mem")
    c.step("snapshot-create", "PUT", "/snapshot/create",
           {"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem})
    c.step("snapshot-files", "GET", "/", expect=200,
           check=lambda r: None if os.path.getsize(snap) > 0 and os.path.getsize(mem) == 64 << 20 else "files missing")
    c.step("resume", "PATCH", "/vm", {"state": "Resumed"})
    c.step("config", "GET", "/vm/config", expect=200,
           check=lambda r: None if r["boot-source"]["kernel_image_path"] == kernel else "%r" % r.get("boot-source"))
    c.step("bad-request", "PUT", "/machine-config", {"vcpu_count": "two"}, expect=400,
           check=lambda r: None if "fault_message" in r else "no fault_message")
    c.step("stop", "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    sys.exit(1 if c.failures else 0)


if __name__ == "__main__":
    main()
