import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// The host programs networks need, found at fixed Debian paths; a missing one is an error naming
/// its Debian package. Commands run with `posix_spawn` (default signals, empty mask), their
/// output captured; they act on the daemon's own network namespace.
public struct HostTools: Sendable {
    /// `ip` (iproute2).
    public var ip: String
    /// `nft` (nftables).
    public var nft: String
    /// `dnsmasq` (dnsmasq-base).
    public var dnsmasq: String
    /// The IPv4 forwarding sysctl.
    public var ipForwardPath = "/proc/sys/net/ipv4/ip_forward"

    /// The tools at their Debian paths; `SWIFTKVM_IP`, `SWIFTKVM_NFT` and `SWIFTKVM_DNSMASQ` override them.
    public init(environment: [String: String] = ProcessInfo.processInfo.environment) {
        func pick(_ env: String, _ candidates: [String]) -> String {
            if let v = environment[env], !v.isEmpty { return v }
            return candidates.first { access($0, X_OK) == 0 } ?? candidates[0]
        }
        ip = pick("SWIFTKVM_IP", ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"])
        nft = pick("SWIFTKVM_NFT", ["/usr/sbin/nft", "/sbin/nft"])
        dnsmasq = pick("SWIFTKVM_DNSMASQ", ["/usr/sbin/dnsmasq"])
    }

    /// Fails unless `path` is executable, naming the Debian package that provides it.
    public static func require(_ path: String, package: String, for purpose: String) throws(ManagerError) {
        guard access(path, X_OK) == 0 else {
            throw ManagerError(.host, "\(path) is missing (\(purpose)): install the Debian package \(package) (`apt-get install \(package)`)")
        }
    }

    public func requireIP() throws(ManagerError) { try Self.require(ip, package: "iproute2", for: "ip manages bridges and TAPs") }
    public func requireNft() throws(ManagerError) { try Self.require(nft, package: "nftables", for: "nft sets up NAT and forwarding") }
    public func requireDnsmasq() throws(ManagerError) { try Self.require(dnsmasq, package: "dnsmasq-base", for: "dnsmasq serves DHCP and DNS") }

    /// What a command did.
    public struct Result: Sendable {
        public var status: Int32
        public var output: String
    }

    /// Runs `executable arguments` to completion (killed after `timeout` seconds), stdout and
    /// stderr captured together.
    public static func run(_ executable: String, _ arguments: [String], timeout: Double = 30) throws(ManagerError) -> Result {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw ManagerError(.host, "pipe: \(ManagerError.errnoText())") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t(), all = sigset_t()
        sigemptyset(&empty)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setflags(&attr, Int16(Int32(POSIX_SPAWN_SETSIGMASK) | Int32(POSIX_SPAWN_SETSIGDEF)))
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, &attr, argv, environ)
        close(fds[1])
        guard rc == 0 else {
            close(fds[0])
            throw ManagerError(.host, "cannot run \(executable): \(ManagerError.errnoText(rc))")
        }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 16384)
        let deadline = Date().addingTimeInterval(timeout)
        var timedOut = false
        while true {
            var p = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, 100)
            if r < 0 && errno != EINTR { break }
            if r > 0 {
                let n = buf.withUnsafeMutableBytes { read(fds[0], $0.baseAddress!, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                if out.count < 1 << 20 { out += buf[0..<n] }
            }
            if Date() > deadline {
                timedOut = true
                kill(pid, SIGKILL)
                break
            }
        }
        close(fds[0])
        let exit = ProcessTools.waitChild(pid)
        let text = String(decoding: out, as: UTF8.self)
        if timedOut {
            throw ManagerError(.timeout, "`\(([executable] + arguments).joined(separator: " "))` did not finish within \(Int(timeout)) s")
        }
        let status = exit.map { $0.code ?? (128 + ($0.signal ?? 0)) } ?? -1
        return Result(status: status, output: text)
    }

    /// Runs a command that must succeed; the error quotes it and its output.
    @discardableResult
    public static func check(_ executable: String, _ arguments: [String]) throws(ManagerError) -> String {
        let r = try run(executable, arguments)
        guard r.status == 0 else {
            let out = r.output.trimmed
            throw ManagerError(.host, "`\(([executable] + arguments).joined(separator: " "))` failed (status \(r.status))\(out.isEmpty ? "" : ": \(out)")")
        }
        return r.output
    }

    // MARK: ip

    /// `ip ARGS`, which must succeed.
    @discardableResult
    public func ip(_ args: String...) throws(ManagerError) -> String { try Self.check(ip, args) }

    /// Whether interface `name` exists.
    public func interfaceExists(_ name: String) -> Bool {
        access("/sys/class/net/\(name)", F_OK) == 0
    }

    /// Whether `name` is a bridge.
    public func isBridge(_ name: String) -> Bool {
        access("/sys/class/net/\(name)/bridge", F_OK) == 0
    }

    /// The bridge `name` is a port of, if any.
    public func master(of name: String) -> String? {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/sys/class/net/\(name)/master", &buf, buf.count - 1)
        guard n > 0 else { return nil }
        let target = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return target.split(separator: "/").last.map(String.init)
    }

    /// The IPv4 routes of the main table (`ip -j -4 route show table main`).
    public func routes() throws(ManagerError) -> [HostRoute] {
        try Self.parseRoutes(try Self.check(ip, ["-j", "-4", "route", "show", "table", "main"]))
    }

    /// Parses `ip -j -4 route` output (`dst` is `default`, `a.b.c.d` or `a.b.c.d/N`).
    public static func parseRoutes(_ json: String) throws(ManagerError) -> [HostRoute] {
        let trimmed = json.trimmed
        if trimmed.isEmpty { return [] }
        guard let list = try? JSONDecoder().decode([JSONValue].self, from: Data(trimmed.utf8)) else {
            throw ManagerError(.host, "cannot parse the output of `ip -j route`: \(trimmed.prefix(200))")
        }
        return list.compactMap { v -> HostRoute? in
            guard let o = v.objectValue, let dst = o["dst"]?.stringValue, let prefix = IPv4Prefix(dst, allowBare: true) else { return nil }
            let dev = o["dev"]?.stringValue
            var text = dst
            if let via = o["gateway"]?.stringValue { text += " via \(via)" }
            if let dev { text += " dev \(dev)" }
            return HostRoute(destination: prefix, device: dev, text: text)
        }
    }

    // MARK: sysctl

    /// The current `net.ipv4.ip_forward` (nil when unreadable).
    public func ipForward() -> Bool? {
        guard let bytes = try? AtomicFile.read(ipForwardPath, limit: 64) else { return nil }
        return bytes.first == UInt8(ascii: "1")
    }

    /// Sets `net.ipv4.ip_forward`.
    public func setIPForward(_ on: Bool) throws(ManagerError) {
        let fd = open(ipForwardPath, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ManagerError(.host, "cannot open \(ipForwardPath): \(ManagerError.errnoText())") }
        defer { close(fd) }
        let text = on ? "1\n" : "0\n"
        guard text.withCString({ write(fd, $0, 2) }) == 2 else {
            throw ManagerError(.host, "cannot write \(ipForwardPath): \(ManagerError.errnoText())")
        }
    }
}

extension String {
    /// The text without leading and trailing whitespace and newlines.
    var trimmed: String {
        String(drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
    }
}
