import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A network namespace made for one test (`ip netns add`), removed with everything in it by
/// `remove()`: the bridges, TAPs and veths inside it, and the processes it started (by PID).
/// Tests that send packets do it only inside such namespaces; nothing here touches the host's
/// own interfaces, routes or firewall.
final class NetworkNamespace: @unchecked Sendable {
    /// Why network tests cannot run here, or nil when they can (root, `ip`, /dev/net/tun).
    static let unavailableReason: String? = {
        if getuid() != 0 { return "network namespaces need root" }
        if !FileManager.default.fileExists(atPath: "/dev/net/tun") { return "/dev/net/tun is missing" }
        if !FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") && !FileManager.default.isExecutableFile(atPath: "/sbin/ip") {
            return "iproute2 (ip) is not installed: run scripts/install-deps"
        }
        return nil
    }()
    static var available: Bool { unavailableReason == nil }

    static let ip = FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") ? "/usr/sbin/ip" : "/sbin/ip"
    private static let counter = NSLock()
    nonisolated(unsafe) private static var next = 0

    struct CommandError: Error, CustomStringConvertible { var description: String }

    /// The namespace's name: `swk-<pid>-<n>-<tag>`, so leftovers name their owner.
    let name: String
    private var children: [NetChild] = []
    private var removed = false

    init(tag: String) throws {
        let n: Int = Self.counter.withLock { Self.next += 1; return Self.next }
        name = String("swk-\(getpid())-\(n)-\(tag)".prefix(40))
        try Self.run([Self.ip, "netns", "add", name])
        try exec(["ip", "link", "set", "lo", "up"])
    }

    deinit { remove() }

    /// Runs `command` inside the namespace and returns its output; throws with its output on failure.
    @discardableResult
    func exec(_ command: [String], timeout: TimeInterval = 30) throws -> String {
        try Self.run([Self.ip, "netns", "exec", name] + command, timeout: timeout)
    }

    /// Starts `command` inside the namespace as a child that `remove()` stops.
    func spawn(_ command: [String]) throws -> NetChild {
        let p = try NetChild(MCChild(Self.ip, ["netns", "exec", name] + command, stdinPipe: true))
        children.append(p)
        return p
    }

    /// Interface counter `name` (e.g. rx_packets, tx_dropped) of `iface` in this namespace, from
    /// /sys/class/net/IFACE/statistics; nil when it cannot be read.
    func statistic(_ iface: String, _ name: String) -> Int? {
        Int(((try? exec(["cat", "/sys/class/net/\(iface)/statistics/\(name)"])) ?? "").trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// A TAP `tap` with `address` (CIDR) on it, up.
    func addTap(_ tap: String, address: String? = nil) throws {
        try exec(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
        if let address { try exec(["ip", "addr", "add", address, "dev", tap]) }
        try exec(["ip", "link", "set", tap, "up"])
    }

    /// A bridge `bridge` with `address` (CIDR) on it, up.
    func addBridge(_ bridge: String, address: String? = nil) throws {
        try exec(["ip", "link", "add", bridge, "type", "bridge"])
        if let address { try exec(["ip", "addr", "add", address, "dev", bridge]) }
        try exec(["ip", "link", "set", bridge, "up"])
    }

    /// A veth pair joining this namespace (`local`, `localAddress`) to `other` (`remote`, `remoteAddress`).
    func link(to other: NetworkNamespace, local: String, localAddress: String, remote: String, remoteAddress: String) throws {
        try exec(["ip", "link", "add", local, "type", "veth", "peer", "name", remote, "netns", other.name])
        try exec(["ip", "addr", "add", localAddress, "dev", local])
        try exec(["ip", "link", "set", local, "up"])
        try other.exec(["ip", "addr", "add", remoteAddress, "dev", remote])
        try other.exec(["ip", "link", "set", remote, "up"])
    }

    /// Stops the children (each by its own PID) and deletes the namespace with its interfaces.
    func remove() {
        guard !removed else { return }
        removed = true
        for c in children { c.kill() }
        children = []
        _ = try? Self.run([Self.ip, "netns", "del", name])
    }

    /// Whether the namespace still exists.
    static func exists(_ name: String) -> Bool {
        ((try? run([ip, "netns", "list"])) ?? "").split(separator: "\n").contains { $0.split(separator: " ").first.map(String.init) == name }
    }

    /// Runs a command to completion. posix_spawn (MCChild), not Foundation's Process: children of
    /// Process inherit the spawning dispatch thread's blocked signals (dnsmasq then ignores
    /// SIGTERM), and its exit monitoring missed exits of `ip netns exec` children here.
    @discardableResult
    static func run(_ command: [String], timeout: TimeInterval = 30) throws -> String {
        let r = try MCChild.run(command[0], Array(command.dropFirst()), timeout: timeout)
        guard r.status == 0 else {
            throw CommandError(description: "`\(command.joined(separator: " "))` failed (status \(r.status)): \(r.stdout)\(r.stderr)")
        }
        return r.stdout
    }
}

/// A child in a namespace, with the interface the guest tests use: output (stdout and stderr),
/// `waitFor`, `send`, `waitForExit`, `kill` (by its own PID).
final class NetChild: @unchecked Sendable {
    let child: MCChild
    init(_ child: MCChild) { self.child = child }

    var commandLine: String { child.commandLine }
    /// Everything written so far on stdout, then stderr, without carriage returns.
    var output: String { (child.stdout.text + child.stderr.text).replacingOccurrences(of: "\r", with: "") }
    var lines: [String] { output.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) }

    /// Waits until the output contains `text`; false on timeout or when the child exits first.
    @discardableResult
    func waitFor(_ text: String, timeout: TimeInterval) -> Bool {
        let end = Date().addingTimeInterval(timeout)
        while Date() < end {
            if output.contains(text) { return true }
            if child.poll() != nil {
                child.stdout.waitForEnd(timeout: 1)
                child.stderr.waitForEnd(timeout: 1)
                return output.contains(text)
            }
            usleep(50_000)
        }
        return false
    }

    func send(_ text: String) { child.writeInput(text) }

    /// The exit status; nil after killing the child on timeout.
    func waitForExit(timeout: TimeInterval) -> Int32? {
        let s = child.wait(timeout: timeout)
        if s == nil { kill() }
        child.stdout.waitForEnd(timeout: 2)
        child.stderr.waitForEnd(timeout: 2)
        return s
    }

    /// SIGTERM, then SIGKILL after a second.
    func kill() { child.stop(grace: 1) }
}
