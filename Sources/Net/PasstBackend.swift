import CNet
#if canImport(Glibc)
import Glibc
#endif

/// User-mode networking through passt (Debian package `passt`, what QEMU and podman use): no
/// root, no host set-up. passt runs as a child on one end of a socket pair (`--fd`), translates
/// the guest's frames to ordinary host sockets (NAT), and serves DHCP, DNS and NDP itself.
///
/// The socket carries QEMU's stream framing: each frame is preceded by its length as a 32-bit
/// big-endian number, and has no virtio header (the device adds and strips it). Frames are
/// buffered on both sides of the stream: a frame that arrived in pieces is handed over whole, and
/// a frame the socket took only in part is finished before the next one.
public final class PasstBackend: NetBackend, @unchecked Sendable {
    /// A `hostfwd` rule: host port → guest port.
    public struct Forward: Sendable, Equatable {
        public var udp: Bool
        public var hostAddress: String
        public var hostPort: UInt16
        public var guestPort: UInt16
        public init(udp: Bool, hostAddress: String = "", hostPort: UInt16, guestPort: UInt16) {
            self.udp = udp; self.hostAddress = hostAddress; self.hostPort = hostPort; self.guestPort = guestPort
        }
    }

    public let fd: Int32
    public var label: String { "passt (pid \(pid))" }
    public var hasVnetHeader: Bool { false }
    public var supportedOffloads: NetOffloads { [] }
    /// passt's MTU is 65520 (its DHCP tells the guest), so frames up to 64 KiB arrive.
    public var maximumFrameSize: Int? { Self.maxFrame }
    /// The passt process.
    public let pid: pid_t
    private var input: [UInt8]
    private var inputStart = 0, inputEnd = 0
    private var output: [UInt8] = []
    private var outputStart = 0
    private var closed = false

    /// Largest frame passt sends (its 64 KiB buffer).
    static let maxFrame = 65535

    /// Where passt is looked for.
    public static let searchPath = ["/usr/bin/passt", "/usr/local/bin/passt", "/bin/passt"]

    /// Starts passt with `forwards` on a new socket pair. Fails, naming the package, when passt is
    /// not installed. `logPath` receives passt's messages (nil: discarded).
    public init(forwards: [Forward] = [], executable: String? = nil, logPath: String? = nil) throws(NetError) {
        guard let passt = (executable.map { [$0] } ?? Self.searchPath).first(where: { access($0, X_OK) == 0 }) else {
            throw NetError("passt is not installed: user-mode networking needs it (Debian package passt)")
        }
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw .system("socketpair for passt", errno: errno)
        }
        var args = [passt, "--foreground", "--quiet", "--one-off", "--fd", "3"]
        for f in forwards {
            let host = f.hostAddress.isEmpty ? "" : "\(f.hostAddress)/"
            args += [f.udp ? "--udp-ports" : "--tcp-ports", "\(host)\(f.hostPort):\(f.guestPort)"]
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let log = logPath ?? "/dev/null"
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_adddup2(&actions, pair[1], 3)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var all = sigset_t(), none = sigset_t()
        sigfillset(&all)
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        let argv = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, passt, &actions, &attr, argv, environ)
        Glibc.close(pair[1])
        guard rc == 0 else {
            Glibc.close(pair[0])
            throw .system("cannot start \(passt)", errno: rc)
        }
        _ = fcntl(pair[0], F_SETFL, fcntl(pair[0], F_GETFL) | O_NONBLOCK)
        fd = pair[0]
        pid = child
        input = [UInt8](repeating: 0, count: 4 * (Self.maxFrame + 4))
    }

    deinit { close() }

    public func setOffloads(_ offloads: NetOffloads) throws(NetError) {}

    public func receive(into iov: UnsafeBufferPointer<iovec>) -> Int {
        while true {
            if let n = takeFrame(into: iov) { return n }
            // Make room, then read what the socket has.
            if inputStart > 0 {
                let pending = inputEnd - inputStart
                if pending > 0 { input.withUnsafeMutableBytes { $0.baseAddress!.copyMemory(from: $0.baseAddress! + inputStart, byteCount: pending) } }
                inputStart = 0
                inputEnd = pending
            }
            let n = input.withUnsafeMutableBytes { read(fd, $0.baseAddress! + inputEnd, $0.count - inputEnd) }
            if n > 0 { inputEnd += n; continue }
            if n == 0 { return -Int(EPIPE) }
            if errno == EINTR { continue }
            return -Int(errno)
        }
    }

    /// Copies the next whole buffered frame into `iov` (truncated to fit) and returns its length.
    private func takeFrame(into iov: UnsafeBufferPointer<iovec>) -> Int? {
        guard inputEnd - inputStart >= 4 else { return nil }
        let length = input.withUnsafeBytes { p -> Int in
            Int(UInt32(bigEndian: p.loadUnaligned(fromByteOffset: inputStart, as: UInt32.self)))
        }
        guard length <= Self.maxFrame + 4 else {
            // Not passt's framing: drop everything buffered rather than misread the stream.
            inputStart = inputEnd
            return -Int(EPROTO)
        }
        guard inputEnd - inputStart >= 4 + length else { return nil }
        guard iov.reduce(0, { $0 + $1.iov_len }) >= length else {
            // The guest has no room for it: drop the frame whole rather than hand over a part.
            inputStart += 4 + length
            return -Int(EMSGSIZE)
        }
        var copied = 0
        input.withUnsafeBytes { src in
            for v in iov where copied < length {
                let n = min(v.iov_len, length - copied)
                v.iov_base!.copyMemory(from: src.baseAddress! + inputStart + 4 + copied, byteCount: n)
                copied += n
            }
        }
        inputStart += 4 + length
        return copied
    }

    public func send(_ iov: UnsafeBufferPointer<iovec>) -> Int {
        // Finish the frame the socket took in part first.
        guard flushOutput() else { return -Int(EAGAIN) }
        let length = iov.reduce(0) { $0 + $1.iov_len }
        var prefix = UInt32(length).bigEndian
        return withUnsafeMutableBytes(of: &prefix) { p -> Int in
            var all = [iovec(iov_base: p.baseAddress, iov_len: 4)] + Array(iov)
            let n = all.withUnsafeMutableBufferPointer { cnet_writev(fd, $0.baseAddress, Int32($0.count)) }
            if n == -Int(EAGAIN) || n == -Int(EINTR) { return -Int(EAGAIN) }
            if n < 0 { return n }
            if n < 4 + length {
                // Keep the rest for the next write (the frame counts as sent).
                var skip = n
                for k in 0..<all.count {
                    let v = all[k]
                    if skip >= v.iov_len { skip -= v.iov_len; continue }
                    output += UnsafeRawBufferPointer(start: v.iov_base! + skip, count: v.iov_len - skip)
                    skip = 0
                }
                all.removeAll()
            }
            return length
        }
    }

    /// Writes buffered output; true when nothing is left.
    private func flushOutput() -> Bool {
        while outputStart < output.count {
            let n = output.withUnsafeBytes { write(fd, $0.baseAddress! + outputStart, $0.count - outputStart) }
            if n > 0 { outputStart += n; continue }
            if n < 0 && errno == EINTR { continue }
            return false
        }
        output.removeAll(keepingCapacity: true)
        outputStart = 0
        return true
    }

    /// Closes the socket (passt, started with --one-off, then exits) and reaps passt.
    public func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(fd)
        var status: Int32 = 0
        for _ in 0..<100 {
            if waitpid(pid, &status, WNOHANG) == pid { return }
            usleep(10_000)
        }
        kill(pid, SIGTERM)
        _ = waitpid(pid, &status, 0)
    }
}
