#if canImport(Glibc)
import Glibc
#endif

/// What the flood and resource tests observe from outside a server process: its descriptors and resident memory,
/// and idle client connections to its Unix socket.
public enum ProcessProbes {
    /// Open descriptors (entries of /proc/PID/fd) and resident KiB (VmRSS) of `pid`; -1 for what cannot be read.
    public static func usage(_ pid: pid_t) -> (fds: Int, rssKB: Int) {
        var fds = -1
        if let dir = opendir("/proc/\(pid)/fd") {
            fds = 0
            while let e = readdir(dir) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name != "." && name != ".." { fds += 1 }
            }
            closedir(dir)
        }
        var rss = -1
        if let f = fopen("/proc/\(pid)/status", "r") {
            var line = [CChar](repeating: 0, count: 256)
            while fgets(&line, Int32(line.count), f) != nil {
                let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if text.hasPrefix("VmRSS:") { rss = Int(text.split(separator: " ").dropFirst().first ?? "") ?? -1 }
            }
            fclose(f)
        }
        return (fds, rss)
    }

    /// A connected Unix stream socket to `path` that sends nothing, or -1.
    public static func idleClient(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return -1 }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in path.utf8.prefix(p.count - 1).enumerated() { p[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 { close(fd); return -1 }
        return fd
    }

    /// Whether the server closed `fd` (a read gives end of file within 200 ms).
    public static func closedByServer(_ fd: Int32) -> Bool {
        var tv = timeval(tv_sec: 0, tv_usec: 200_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var b: UInt8 = 0
        return read(fd, &b, 1) == 0
    }
}
