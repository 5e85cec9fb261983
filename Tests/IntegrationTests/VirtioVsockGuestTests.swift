import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing

// The freestanding virtio-vsock driver (guest/programs/virtio_vsock.c) against swiftkvm's vsock
// device, with this test as the host side of Firecracker's Unix-socket muxer: it connects to the
// device's socket and sends `CONNECT <port>\n` (host-initiated), and serves `<uds>_<port>` for the
// guest's connections (guest-initiated). swiftkvm runs as a child spawned with posix_spawn.

/// Byte i of a test stream (the guest program's pattern).
private func vsockPattern(_ count: Int, from start: Int = 0) -> [UInt8] {
    (start..<(start + count)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ ($0 >> 8)) }
}

/// Minimal blocking Unix-socket helpers for the host side.
private enum UnixSocket {
    static func address(_ path: String) -> sockaddr_un {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &a.sun_path) { p in
            for (i, b) in path.utf8.enumerated() where i < p.count - 1 { p[i] = b }
        }
        return a
    }

    static func connect(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var a = address(path)
        let r = withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 { close(fd); return -1 }
        var tv = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    static func listen(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var a = address(path)
        let r = withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0, Glibc.listen(fd, 16) == 0 else { close(fd); return -1 }
        return fd
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    /// Reads until `count` bytes or EOF/error/timeout.
    static func read(_ fd: Int32, _ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
            if n <= 0 { break }
            got += n
        }
        return Array(out[0..<got])
    }

    /// Reads one line (up to 64 bytes), without the newline.
    static func readLine(_ fd: Int32) -> String? {
        var line: [UInt8] = []
        var b: UInt8 = 0
        while line.count < 64 {
            guard recv(fd, &b, 1, 0) == 1 else { return nil }
            if b == 0x0a { return String(decoding: line, as: UTF8.self) }
            line.append(b)
        }
        return nil
    }
}

/// A host server on `path` that, per accepted connection, echoes (or discards) until EOF, on a thread.
private final class HostServer: @unchecked Sendable {
    let fd: Int32
    private let lock = NSLock()
    private var _bytes: [Int] = []
    /// Bytes handled per connection, in order.
    var bytes: [Int] { lock.lock(); defer { lock.unlock() }; return _bytes }

    init(path: String, echo: Bool) throws {
        fd = UnixSocket.listen(path)
        try #require(fd >= 0, "cannot listen on \(path)")
        let listener = fd
        Thread.detachNewThread { [self] in
            while true {
                let c = accept(listener, nil, nil)
                if c < 0 { return }
                var total = 0
                var buf = [UInt8](repeating: 0, count: 65536)
                while true {
                    let n = buf.withUnsafeMutableBytes { recv(c, $0.baseAddress!, $0.count, 0) }
                    if n <= 0 { break }
                    total += n
                    if echo, !UnixSocket.writeAll(c, Array(buf[0..<n])) { break }
                }
                close(c)
                lock.lock(); _bytes.append(total); lock.unlock()
            }
        }
    }

    func stop() { Glibc.shutdown(fd, Int32(SHUT_RDWR)); close(fd) }
}

@Suite("virtio-vsock: the freestanding driver against the Unix-socket muxer", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct VirtioVsockGuestTests {
    /// A fresh directory for the sockets (short: sun_path holds 107 bytes).
    func socketDirectory() -> String {
        let dir = "/tmp/vsk-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
        mkdir(dir, 0o700)
        return dir
    }

    func removeDirectory(_ dir: String) {
        for n in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] { unlink(dir + "/" + n) }
        rmdir(dir)
    }

    /// Starts virtio_vsock with `cmdline` and the device on `uds` (cid 7).
    func start(cmdline: String, uds: String) throws -> NetChild {
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        if let error = GuestTestEnvironment.guestBuildError { Issue.record("\(error)") }
        return NetChild(try MCChild(swiftkvm, ["run"] + programArguments("virtio_vsock", cmdline: cmdline)
                                    + ["--memory", "64M", "--vsock", "cid=7,uds=\(uds)"]))
    }

    func finish(_ child: NetChild, timeout: TimeInterval = 120) -> GuestReport {
        let status = child.waitForExit(timeout: timeout)
        let report = GuestReport(status: status, output: child.output, command: child.commandLine)
        if status == nil { Issue.record("timed out after \(Int(timeout)) s: \(report.command)\n\(report.output)") }
        return report
    }

    @Test("host → guest (CONNECT 1024 → OK <port>) and guest → host (<uds>_1025): 1 MiB echoed byte-exact each way; refused ports get RST; the socket is removed at exit")
    func echo() throws {
        let dir = socketDirectory()
        defer { removeDirectory(dir) }
        let uds = dir + "/v.sock"
        let server = try HostServer(path: uds + "_1025", echo: true)
        defer { server.stop() }
        let child = try start(cmdline: "cid=7 port=1024 hostport=1025 refused=1999 n=1048576", uds: uds)
        var hostEcho: [UInt8] = []
        var okLine: String?
        var refusedLine: String? = "unset"
        let data = vsockPattern(1 << 20)
        if child.waitFor("VSOCK-READY listen 1024", timeout: 60) {
            // A port the guest does not listen on: the guest answers RST, the host socket just closes.
            let r = UnixSocket.connect(uds)
            #expect(r >= 0)
            _ = UnixSocket.writeAll(r, Array("CONNECT 999\n".utf8))
            refusedLine = UnixSocket.readLine(r)
            close(r)
            let fd = UnixSocket.connect(uds)
            try #require(fd >= 0, "connect to \(uds)")
            _ = UnixSocket.writeAll(fd, Array("CONNECT 1024\n".utf8))
            okLine = UnixSocket.readLine(fd)
            let writer = Thread { _ = UnixSocket.writeAll(fd, data) }
            writer.start()
            hostEcho = UnixSocket.read(fd, data.count)
            close(fd)
        }
        let r = finish(child)
        #expect(refusedLine == nil, "CONNECT to a port nobody listens on: \(refusedLine ?? "")")
        let port = try #require(okLine.flatMap { $0.hasPrefix("OK ") ? UInt32($0.dropFirst(3)) : nil }, "OK line: \(okLine ?? "none")\n\(r.output)")
        #expect(port >= 1 << 30)
        #expect(hostEcho.count == data.count)
        #expect(hostEcho == data, "host → guest echo differs from what was sent")
        expectPass(r, checks: ["vsock-setup", "vsock-config", "listen-echo", "connect-refused", "connect-echo"])
        #expect(server.bytes == [1 << 20], "the host echo server handled \(server.bytes)")
        #expect(access(uds, F_OK) != 0, "the listening socket is removed at exit")
    }

    @Test("Firecracker's config file: a vsock section (guest_cid, uds_path) gives the guest its device, on virtio-mmio (the vmm's default) and with --enable-pci on PCI; echoes both ways",
          arguments: [false, true])
    func firecrackerConfig(enablePCI: Bool) throws {
        let dir = socketDirectory()
        defer { removeDirectory(dir) }
        let uds = dir + "/v.sock"
        let server = try HostServer(path: uds + "_1025", echo: true)
        defer { server.stop() }
        let config = """
            {"boot-source": {"kernel_image_path": "\(GuestTestEnvironment.guestImage("virtio_vsock"))",
                             "boot_args": "\(enablePCI ? "" : "mmio ")cid=7 port=1024 hostport=1025 refused=1999 n=65536"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
             "vsock": {"guest_cid": 7, "uds_path": "\(uds)"}}
            """
        try config.write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let child = NetChild(try MCChild(swiftkvm, ["vmm"] + (enablePCI ? ["--enable-pci"] : []) + ["--no-api", "--config-file", dir + "/config.json"]))
        let data = vsockPattern(65536)
        var echoed: [UInt8] = []
        if child.waitFor("VSOCK-READY listen 1024", timeout: 60) {
            let r = UnixSocket.connect(uds)
            _ = UnixSocket.writeAll(r, Array("CONNECT 999\n".utf8))
            _ = UnixSocket.readLine(r)
            close(r)
            let fd = UnixSocket.connect(uds)
            try #require(fd >= 0, "connect to \(uds)")
            _ = UnixSocket.writeAll(fd, Array("CONNECT 1024\n".utf8))
            #expect(UnixSocket.readLine(fd)?.hasPrefix("OK ") == true)
            _ = UnixSocket.writeAll(fd, data)
            echoed = UnixSocket.read(fd, data.count)
            close(fd)
        }
        let r = finish(child)
        #expect(echoed == data, "host → guest echo through the config file's device\n\(r.output)")
        #expect(r.okNames.isSuperset(of: ["vsock-config", "listen-echo", "connect-echo"]), "\(r.output)")
        #expect(server.bytes == [65536], "the host echo server handled \(server.bytes)")
    }

    @Test("bench modes: 64 KiB writes guest → host and host → guest report MB/s, and connection set-up latency")
    func bench() throws {
        let dir = socketDirectory()
        defer { removeDirectory(dir) }
        let uds = dir + "/v.sock"
        let sink = try HostServer(path: uds + "_1025", echo: false)
        defer { sink.stop() }
        let khz = "tsc_khz=\(hostTSCkHz())"
        let n = 32 << 20
        let tx = finish(try start(cmdline: "bench=tx hostport=1025 n=\(n) \(khz)", uds: uds))
        expectPass(tx, checks: ["bench"])
        #expect(tx.line(startingWith: "BENCH tx done bytes=\(n)") != nil, "\(tx.output)")
        let connect = finish(try start(cmdline: "bench=connect hostport=1025 n=50 \(khz)", uds: uds))
        expectPass(connect, checks: ["bench"])
        #expect(connect.line(startingWith: "BENCH connect done n=50") != nil, "\(connect.output)")
        let child = try start(cmdline: "bench=rx port=1024 \(khz)", uds: uds)
        if child.waitFor("VSOCK-READY", timeout: 60) {
            let fd = UnixSocket.connect(uds)
            _ = UnixSocket.writeAll(fd, Array("CONNECT 1024\n".utf8))
            #expect(UnixSocket.readLine(fd)?.hasPrefix("OK ") == true)
            let chunk = vsockPattern(1 << 16)
            for _ in 0..<(n >> 16) where UnixSocket.writeAll(fd, chunk) {}
            close(fd)
        }
        let rx = finish(child)
        expectPass(rx, checks: ["bench"])
        #expect(rx.line(startingWith: "BENCH rx done bytes=\(n)") != nil, "\(rx.output)")
        for r in [tx, rx, connect] {
            for line in r.lines where line.hasPrefix("BENCH") || line.hasPrefix("# tx:") || line.hasPrefix("# rx:") || line.hasPrefix("# connect:") {
                print("vsock \(line)")
            }
        }
    }

    @Test("bad --vsock input exits 2 naming the problem: a reserved CID, a path that is not a socket, a path too long for sun_path, a missing key")
    func badInput() throws {
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        let dir = socketDirectory()
        defer { removeDirectory(dir) }
        let file = dir + "/file"
        FileManager.default.createFile(atPath: file, contents: Data([1]))
        let long = "/tmp/" + String(repeating: "v", count: 110)
        let cases: [(String, String)] = [
            ("cid=2,uds=\(dir)/a.sock", "the guest CID must be 3"),
            ("cid=3,uds=\(file)", "exists and is not a socket"),
            ("cid=3,uds=\(long)", "a Unix socket path holds at most 107"),
            ("cid=3", "uds=PATH is required"),
            ("cid=x,uds=\(dir)/a.sock", "expected a number"),
        ]
        for (value, message) in cases {
            let r = try MCChild.run(swiftkvm, ["run"] + programArguments("virtio_vsock") + ["--vsock", value], timeout: 30)
            #expect(r.status == 2, "--vsock \(value): status \(r.status)\n\(r.stderr)")
            #expect(r.stderr.contains("--vsock") && r.stderr.contains(message), "--vsock \(value): \(r.stderr)")
        }
        #expect(access(dir + "/a.sock", F_OK) != 0)
        #expect(access(file, F_OK) == 0, "a file at the path is left alone")
    }

    /// The host's TSC rate in kHz (for the guest's MB/s lines).
    func hostTSCkHz() -> UInt64 {
        if let text = try? String(contentsOfFile: "/sys/devices/system/cpu/cpu0/tsc_freq_khz", encoding: .utf8),
           let khz = UInt64(text.filter(\.isNumber)), khz > 0 { return khz }
        let info = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let mhz = info.split(separator: "\n").first { $0.hasPrefix("cpu MHz") }?.split(separator: ":").last
        return UInt64((Double(mhz?.trimmingCharacters(in: .whitespaces) ?? "") ?? 0) * 1000)
    }
}

// One boot of the lean Linux guest with a vsock device: Linux's own virtio_vsock driver against the
// device, driven from its shell with guest/tools/vsock.c (built static here and added to the default
// initramfs as a second cpio archive, which the kernel unpacks after the first).
@Suite("Linux: virtio-vsock between the guest's AF_VSOCK sockets and host Unix sockets", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: !LinuxBoot.skipRequested, "SWIFTKVM_SKIP_LINUX=1"))
struct LinuxVsockTests {
    @Test("host → guest CONNECT to a Linux listener and guest → host connect to <uds>_1025: 1 MiB echoed byte-exact each way; a port nobody serves is refused",
          .timeLimit(.minutes(20)))
    func echo() throws {
        let root = GuestTestEnvironment.repoRoot
        let kernel = root.appendingPathComponent("assets/lean/vmlinux").path
        let initramfs = root.appendingPathComponent("assets/initramfs.cpio").path
        try #require(FileManager.default.fileExists(atPath: kernel), "assets/lean/vmlinux missing: run scripts/guest-kernel")
        try #require(FileManager.default.fileExists(atPath: initramfs), "assets/initramfs.cpio missing: run scripts/guest-assets")
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let work = "/tmp/vsk-linux-\(getpid())"
        try FileManager.default.createDirectory(atPath: work + "/stage/bin", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let cc = try ProcessRunner.run("/usr/bin/gcc", ["-static", "-O2", "-o", work + "/stage/bin/vsock",
                                                        root.appendingPathComponent("guest/tools/vsock.c").path])
        try #require(cc.status == 0, "gcc -static guest/tools/vsock.c: \(cc.stderr)")
        let pack = try ProcessRunner.run("/bin/sh", ["-c", "cd \(work)/stage && find bin | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet > \(work)/extra.cpio"])
        try #require(pack.status == 0, "cpio: \(pack.stderr)")
        var combined = try Data(contentsOf: URL(fileURLWithPath: initramfs))
        combined.append(try Data(contentsOf: URL(fileURLWithPath: work + "/extra.cpio")))
        try combined.write(to: URL(fileURLWithPath: work + "/initramfs.cpio"))

        let uds = work + "/v.sock"
        let server = try HostServer(path: uds + "_1025", echo: true)
        defer { server.stop() }
        let vm = NetChild(try MCChild(swiftkvm, ["run", "--guest", "lean", "--initrd", work + "/initramfs.cpio", "--memory", "256M",
                                                 "--serial", "stdio", "--time-dilation", "10", "--vsock", "cid=9,uds=\(uds)"],
                                      stdinPipe: true))
        let ready = vm.waitFor(LinuxBoot.readyMarker, timeout: LinuxBoot.bootTimeout)
        var okLine: String?
        var hostEcho: [UInt8] = []
        var listened = false, echoed = false, connected = false, refused = false
        let data = vsockPattern(1 << 20)
        if ready {
            Thread.sleep(forTimeInterval: 2)
            vm.send("vsock listen 1024 &\n")
            listened = vm.waitFor("VSOCK-LISTENING 1024", timeout: 120)
            if listened {
                let fd = UnixSocket.connect(uds)
                if fd >= 0 {
                    _ = UnixSocket.writeAll(fd, Array("CONNECT 1024\n".utf8))
                    okLine = UnixSocket.readLine(fd)
                    let writer = Thread { _ = UnixSocket.writeAll(fd, data) }
                    writer.start()
                    hostEcho = UnixSocket.read(fd, data.count)
                    close(fd)
                }
                echoed = vm.waitFor("VSOCK-ECHOED bytes=1048576 bad=0", timeout: 120)
            }
            vm.send("vsock connect 2 1025 1048576\n")
            connected = vm.waitFor("VSOCK-CONNECTED bytes=1048576 bad=0 writer=0", timeout: 240)
            vm.send("vsock connect 2 1999 1\n")
            refused = vm.waitFor("VSOCK-ERROR connect", timeout: 120)
            vm.send("poweroff -f\n")
        }
        let status = vm.waitForExit(timeout: ready ? 180 : 1)
        let context = "\(vm.commandLine)\nexit status \(status.map(String.init) ?? "none (killed)")\n" + vm.lines.suffix(40).joined(separator: "\n")
        #expect(ready, "no \(LinuxBoot.readyMarker)\n\(context)")
        #expect(listened, "the guest's listener did not start\n\(context)")
        #expect(okLine?.hasPrefix("OK ") == true, "CONNECT 1024 answered \(okLine ?? "nothing")\n\(context)")
        #expect(hostEcho == data, "host → guest: \(hostEcho.count) bytes came back\n\(context)")
        #expect(echoed, "the guest did not echo 1 MiB intact\n\(context)")
        #expect(connected, "guest → host: the 1 MiB echo through <uds>_1025 did not come back intact\n\(context)")
        #expect(server.bytes.first == 1 << 20, "the host echo server handled \(server.bytes)")
        #expect(refused, "connecting to a port nobody serves did not fail\n\(context)")
        #expect(status == 0, "exit status after poweroff\n\(context)")
        #expect(access(uds, F_OK) != 0, "the listening socket is removed at exit")
    }
}
