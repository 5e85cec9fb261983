import CZlib
import FoundationEssentials
import GuestMemory
import KVM
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Where a live-migration stream goes to or comes from: `unix:PATH` or `tcp:HOST:PORT`.
public enum MigrationEndpoint: Sendable, Equatable, CustomStringConvertible {
    case unix(String)
    case tcp(host: String, port: UInt16)

    /// Parses `unix:PATH` or `tcp:HOST:PORT` (HOST a name, an IPv4 address or a bracketed IPv6 address).
    public init(parsing text: String) throws {
        func bad(_ why: String) -> VMMError { .invalidValue(what: "migration address", value: text, reason: why) }
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty, path.utf8.count < 108 else { throw bad("the socket path must have 1 to 107 bytes") }
            self = .unix(path)
        } else if text.hasPrefix("tcp:") {
            let rest = text.dropFirst(4)
            guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]), port > 0 else {
                throw bad("expected tcp:HOST:PORT with a port from 1 to 65535")
            }
            var host = String(rest[..<colon])
            if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty else { throw bad("no host before the port") }
            self = .tcp(host: host, port: port)
        } else {
            throw bad("expected unix:PATH or tcp:HOST:PORT")
        }
    }

    public var description: String {
        switch self {
        case .unix(let p): return "unix:\(p)"
        case .tcp(let h, let p): return h.contains(":") ? "tcp:[\(h)]:\(p)" : "tcp:\(h):\(p)"
        }
    }

    private func fail(_ what: String, _ err: Int32 = errno) -> VMMError {
        .setup("migration \(what) \(self): \(String(cString: strerror(err)))")
    }

    /// The socket addresses to try, as (family, address bytes).
    private func addresses() throws -> [(Int32, [UInt8])] {
        switch self {
        case .unix(let path):
            var a = sockaddr_un()
            a.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &a.sun_path) { dst in
                for (i, b) in path.utf8.enumerated() { dst[i] = b }
            }
            return [(AF_UNIX, withUnsafeBytes(of: a) { Array($0) })]
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = AI_NUMERICSERV
            var list: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, String(port), &hints, &list)
            guard rc == 0, let first = list else {
                throw VMMError.invalidValue(what: "migration address", value: description, reason: String(cString: gai_strerror(rc)))
            }
            defer { freeaddrinfo(first) }
            var out: [(Int32, [UInt8])] = []
            var p: UnsafeMutablePointer<addrinfo>? = first
            while let ai = p {
                out.append((ai.pointee.ai_family, Array(UnsafeRawBufferPointer(start: ai.pointee.ai_addr, count: Int(ai.pointee.ai_addrlen)))))
                p = ai.pointee.ai_next
            }
            return out
        }
    }

    /// Connects (blocking, with the stream's timeouts set).
    func connect() throws -> Int32 {
        var lastError = ECONNREFUSED
        for (family, addr) in try addresses() {
            let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { lastError = errno; continue }
            let rc = addr.withUnsafeBytes { Glibc.connect(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
            if rc == 0 { MigrationWire.setTimeouts(fd); return fd }
            lastError = errno
            close(fd)
        }
        throw fail("cannot connect to", lastError)
    }

    /// A listening socket (a Unix socket path must not exist yet).
    func listen() throws -> Int32 {
        guard let (family, addr) = try addresses().first else { throw fail("has no address:", EINVAL) }
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw fail("cannot listen on") }
        var one: Int32 = 1
        if family != AF_UNIX { setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size)) }
        let rc = addr.withUnsafeBytes { bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
        guard rc == 0, Glibc.listen(fd, 1) == 0 else {
            let e = errno
            close(fd)
            throw fail("cannot listen on", e)
        }
        return fd
    }
}

/// The migration stream's framing over a connected socket (docs/SNAPSHOT.md, "Migration stream").
final class MigrationWire {
    static let magic = Array("SKVMMIGR".utf8)
    static let version: UInt32 = 1
    /// Pages per page record at most.
    static let maxPagesPerRecord = 256
    static let pageSize = 4096

    enum Tag: UInt8 {
        case pages = 0x50     // 'P': offset u64, count u32, crc32 u32, data
        case zeros = 0x5A     // 'Z': offset u64, count u32
        case state = 0x53     // 'S': length u64, SnapshotFile bytes
        case ready = 0x52     // 'R' (target): the machine is built
        case refused = 0x58   // 'X' (target): length u32, message
        case go = 0x47        // 'G' (source): run it
        case running = 0x41   // 'A' (target): it runs
    }

    let fd: Int32
    let peer: String
    private(set) var bytesSent: UInt64 = 0

    /// A page record's data is copied here before it is checksummed and sent.
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: maxPagesPerRecord * pageSize, alignment: pageSize)

    init(fd: Int32, peer: String) { self.fd = fd; self.peer = peer }
    deinit {
        close(fd)
        scratch.deallocate()
    }

    /// Send and receive time out after `seconds` without progress: a stalled peer is an error, not a hang.
    static func setTimeouts(_ fd: Int32, seconds: Int = 60) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    private func fail(_ what: String, _ err: Int32) -> VMMError {
        .setup("migration stream \(peer): \(what): \(err == 0 ? "the peer closed the connection" : String(cString: strerror(err)))")
    }

    func send(_ buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = Glibc.send(fd, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw fail("send", n == 0 ? 0 : errno) }
            done += n
        }
        bytesSent += UInt64(buffer.count)
    }

    func send(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try send($0) } }

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = recv(fd, buffer.baseAddress! + done, buffer.count - done, 0)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw fail("receive", n == 0 ? 0 : errno) }
            done += n
        }
    }

    func receive(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try receive(into: $0) }
        return out
    }

    func receiveTag() throws -> UInt8 { try receive(1)[0] }

    static func crc32(_ p: UnsafeRawBufferPointer) -> UInt32 {
        UInt32(CZlib.crc32(0, p.baseAddress?.assumingMemoryBound(to: UInt8.self), uInt(p.count)))
    }
}

/// What a disk file looks like, cheaply: its size and the CRC-32 of its first and last 64 KiB. A
/// migration's source takes it after closing the file, and the target compares it with the file it
/// is about to open at the same path: live migration of disks needs storage both hosts share.
public struct DiskFingerprint: Codable, Sendable, Equatable {
    public var path: String
    public var size: UInt64
    public var headCRC: UInt32
    public var tailCRC: UInt32
    static let span = 64 << 10

    /// Reads `path`'s fingerprint; throws naming the file when it cannot be read.
    public init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw VMMError.setup("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw VMMError.setup("cannot stat \(path): \(String(cString: strerror(errno)))") }
        let size = UInt64(st.st_size)
        func crc(at offset: UInt64) throws -> UInt32 {
            var buffer = [UInt8](repeating: 0, count: Int(min(UInt64(DiskFingerprint.span), size)))
            var done = 0
            while done < buffer.count {
                let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(offset) + off_t(done)) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw VMMError.setup("cannot read \(path) at offset \(offset + UInt64(done)): \(n == 0 ? "end of file" : String(cString: strerror(errno)))") }
                done += n
            }
            return buffer.withUnsafeBytes { MigrationWire.crc32($0) }
        }
        let head = try crc(at: 0), tail = try crc(at: size - min(UInt64(Self.span), size))
        self.path = path
        self.size = size
        headCRC = head
        tailCRC = tail
    }
}

/// How a live migration went (`Machine.migrate`).
public struct MigrationReport: Codable, Sendable, Equatable {
    /// Memory passes, the last one with the vCPUs paused.
    public var passes: Int
    /// Bytes written to the stream.
    public var bytesSent: UInt64
    /// Pages sent, zero pages counted once each (they cost a record, not their bytes).
    public var pagesSent: UInt64
    /// From pausing the vCPUs to the target's confirmation that it runs, in milliseconds.
    public var downtimeMs: Double
    /// The whole migration, in milliseconds.
    public var totalMs: Double
    /// Pages dirtied per second during the last pass that ran with the guest running, in MiB/s.
    public var dirtyRateMiBs: Double
    enum CodingKeys: String, CodingKey {
        case passes, bytesSent = "bytes_sent", pagesSent = "pages_sent", downtimeMs = "downtime_ms", totalMs = "total_ms"
        case dirtyRateMiBs = "dirty_rate_mib_s"
    }
}

extension Machine {
    /// Live pre-copy migration to `endpoint` (a `swiftkvm vmm --incoming` there): sends all of RAM
    /// while the guest runs, then the pages it dirtied, pass after pass, until the rest fits
    /// `maxDowntimeMs` at the measured bandwidth (or 30 passes); then pauses, sends the rest and
    /// the device and vCPU state, and waits for the target to confirm it runs. `progress` gets a line
    /// per pass. On success the caller stops this machine. On a failure before the target was told
    /// to run, the guest is resumed and nothing is lost; a failure after it leaves the guest paused
    /// (the target may be running) and says so.
    ///
    /// Disks stay where they are (shared storage, as QEMU's migration without block copy): with the
    /// guest paused, each image is closed and its locks released, and the state carries each file's
    /// `DiskFingerprint`; the target checks it, then opens and locks the same paths. If the target
    /// refuses or the stream fails before it was told to run, the images are opened again here
    /// (retrying for 10 s while a target that gave up closes them) before the guest resumes.
    public func migrate(to endpoint: MigrationEndpoint, maxDowntimeMs: Int, progress: (String) -> Void) throws -> MigrationReport {
        let start = PauseGate.nowNs()
        let wire = MigrationWire(fd: try endpoint.connect(), peer: endpoint.description)
        let loggingBefore = tracksDirtyLogging
        try setDirtyLogging(true)
        var paused = false, devicesHeld = false, told = false, disksClosed = false, keepPaused = false
        defer {
            if !told {
                if devicesHeld { virtio.resumeAfterSnapshot() }
                if paused && !keepPaused { resume() }
                if !loggingBefore { try? setDirtyLogging(false) }
            }
        }
        var header = MigrationWire.magic
        header += withUnsafeBytes(of: MigrationWire.version.littleEndian) { Array($0) } + [0, 0, 0, 0]
        header += withUnsafeBytes(of: memory.totalSize.littleEndian) { Array($0) }
        try wire.send(header)

        var pages: UInt64 = 0
        // Pass 1: all of RAM (untouched pages, per mincore, and zero pages as zero records).
        _ = try dirtyPages()
        var t0 = PauseGate.nowNs()
        pages += try sendAll(wire)
        var passes = 1
        var elapsed = Double(PauseGate.nowNs() - t0) / 1e9
        var bandwidth = Double(wire.bytesSent) / max(elapsed, 1e-6)
        progress("pass 1: \(wire.bytesSent >> 20) MiB in \(Int(elapsed * 1000)) ms")
        var pending = try dirtyPages()
        var dirtyRate = 0.0
        while true {
            let bytes = Double(Self.count(pending) * UInt64(MigrationWire.pageSize))
            dirtyRate = bytes / max(elapsed, 1e-6)
            if bytes / bandwidth * 1000 <= Double(maxDowntimeMs) || passes >= 30 { break }
            t0 = PauseGate.nowNs()
            let sentBefore = wire.bytesSent
            pages += try sendDirty(wire, pending)
            passes += 1
            elapsed = Double(PauseGate.nowNs() - t0) / 1e9
            bandwidth = Double(wire.bytesSent - sentBefore) / max(elapsed, 1e-6)
            progress("pass \(passes): \(Int(bytes) >> 20) MiB dirty, \((dirtyRate / 1048576 * 10).rounded() / 10) MiB/s dirtied")
            pending = try dirtyPages()
        }

        // Final pass with the guest and the devices stopped.
        let pausedAt = PauseGate.nowNs()
        if !isPaused { try pause(); paused = true }
        virtio.quiesce()
        devicesHeld = true
        let last = try dirtyPages()
        for r in pending.indices { for w in pending[r].indices { pending[r][w] |= last[r][w] } }
        pages += try sendDirty(wire, pending)
        passes += 1
        var snapshot = try captureState()
        do {
            if !snapshot.config.disks.isEmpty {
                disksClosed = true
                try virtio.closeDisksForHandOff()
                snapshot.diskFingerprints = try snapshot.config.disks.map { try DiskFingerprint(path: $0.path) }
            }
            let state = try SnapshotFile.encode(snapshot)
            try wire.send([MigrationWire.Tag.state.rawValue] + withUnsafeBytes(of: UInt64(state.count).littleEndian) { Array($0) } + state)
            switch try wire.receiveTag() {
            case MigrationWire.Tag.ready.rawValue: break
            case MigrationWire.Tag.refused.rawValue:
                let n = try wire.receive(4).getLE(UInt32.self, at: 0) ?? 0
                let message = String(decoding: try wire.receive(Int(min(n, 4096))), as: UTF8.self)
                throw VMMError.setup("the migration target refused the VM: \(message)")
            case let t: throw VMMError.setup("the migration target answered 0x\(String(t, radix: 16)) instead of ready")
            }
            try wire.send([MigrationWire.Tag.go.rawValue])
            told = true
        } catch {
            guard disksClosed else { throw error }
            // The guest keeps running here: its disks first.
            let deadline = PauseGate.nowNs() + 10_000_000_000
            while true {
                do {
                    try reopenDisksAfterHandOff()
                    break
                } catch let reopen {
                    guard PauseGate.nowNs() < deadline else {
                        keepPaused = true
                        throw VMMError.setup("\(error); the guest stays paused here because its disks could not be opened again: \(reopen)")
                    }
                    usleep(100_000)
                }
            }
            throw error
        }
        guard (try? wire.receiveTag()) == MigrationWire.Tag.running.rawValue else {
            throw VMMError.setup("the migration target was told to run but did not confirm it: it may be running; this VM stays paused")
        }
        let end = PauseGate.nowNs()
        return MigrationReport(passes: passes, bytesSent: wire.bytesSent, pagesSent: pages,
                               downtimeMs: Double(end - pausedAt) / 1e6, totalMs: Double(end - start) / 1e6,
                               dirtyRateMiBs: dirtyRate / 1048576)
    }

    /// Whether the RAM slots log dirty pages now.
    var tracksDirtyLogging: Bool { dirtyLogging.load(ordering: .acquiring) }

    /// Turns KVM's dirty logging of the RAM slots and the devices' log on or off (a slot's flags may
    /// change in place).
    func setDirtyLogging(_ on: Bool) throws {
        guard on != tracksDirtyLogging else { return }
        for (slot, region) in memory.regions.enumerated() {
            try vm.setUserMemoryRegion(slot: UInt32(slot), guestPhys: region.start, size: region.size, host: region.host,
                                       flags: on ? VirtualMachine.logDirtyPages : 0)
        }
        if on { memory.dirtyLog.enable() } else { memory.dirtyLog.disable() }
        dirtyLogging.store(on, ordering: .releasing)
    }

    static func count(_ maps: [[UInt64]]) -> UInt64 {
        maps.reduce(0) { $0 + $1.reduce(0) { $0 + UInt64($1.nonzeroBitCount) } }
    }

    /// Sends every page: resident non-zero runs as page records, the rest as zero records.
    private func sendAll(_ wire: MigrationWire) throws -> UInt64 {
        let pageSize = MigrationWire.pageSize
        var fileOffset: UInt64 = 0
        var sent: UInt64 = 0
        for region in memory.regions {
            let pages = Int(region.size) / pageSize
            var resident = [UInt8](repeating: 1, count: pages)
            if mincore(region.host, Int(region.size), &resident) != 0 { resident = resident.map { _ in 1 } }
            var p = 0
            while p < pages {
                let zero = resident[p] & 1 == 0 || SnapshotIO.isZero(UnsafeRawBufferPointer(start: region.host + p * pageSize, count: pageSize))
                var q = p + 1
                while q < pages, q - p < MigrationWire.maxPagesPerRecord {
                    let z = resident[q] & 1 == 0 || SnapshotIO.isZero(UnsafeRawBufferPointer(start: region.host + q * pageSize, count: pageSize))
                    if z != zero { break }
                    q += 1
                }
                try sendRun(wire, region, fileOffset, p, q - p, zero: zero)
                sent += UInt64(q - p)
                p = q
            }
            fileOffset += region.size
        }
        return sent
    }

    /// Sends the pages set in `maps` (per region) as page records.
    private func sendDirty(_ wire: MigrationWire, _ maps: [[UInt64]]) throws -> UInt64 {
        var fileOffset: UInt64 = 0
        var sent: UInt64 = 0
        for (i, region) in memory.regions.enumerated() {
            let pages = Int(region.size) / MigrationWire.pageSize
            func dirty(_ p: Int) -> Bool { maps[i][p / 64] & (1 << UInt64(p % 64)) != 0 }
            var p = 0
            while p < pages {
                guard dirty(p) else { p += 1; continue }
                var q = p + 1
                while q < pages, dirty(q), q - p < MigrationWire.maxPagesPerRecord { q += 1 }
                try sendRun(wire, region, fileOffset, p, q - p, zero: false)
                sent += UInt64(q - p)
                p = q
            }
            fileOffset += region.size
        }
        return sent
    }

    private func sendRun(_ wire: MigrationWire, _ region: GuestRegion, _ fileOffset: UInt64, _ page: Int, _ count: Int, zero: Bool) throws {
        let offset = fileOffset + UInt64(page * MigrationWire.pageSize)
        var head = [zero ? MigrationWire.Tag.zeros.rawValue : MigrationWire.Tag.pages.rawValue]
        head += withUnsafeBytes(of: offset.littleEndian) { Array($0) }
        head += withUnsafeBytes(of: UInt32(count).littleEndian) { Array($0) }
        guard !zero else { return try wire.send(head) }
        // A copy: the guest (or a device) may write these pages while they are sent; the copy's checksum
        // matches what is sent, and a page changed meanwhile is dirty and goes again in the next pass.
        let bytes = count * MigrationWire.pageSize
        let data = UnsafeMutableRawBufferPointer(rebasing: wire.scratch[..<bytes])
        data.copyMemory(from: UnsafeRawBufferPointer(start: region.host + page * MigrationWire.pageSize, count: bytes))
        head += withUnsafeBytes(of: MigrationWire.crc32(UnsafeRawBufferPointer(data)).littleEndian) { Array($0) }
        try wire.send(head)
        try wire.send(UnsafeRawBufferPointer(data))
    }
}

/// The target side of a live migration (`swiftkvm vmm --incoming`): receives one source's memory
/// into a memfd and its state, then runs the handshake that decides which side runs the guest.
public final class IncomingMigration: @unchecked Sendable {
    /// The machine to build (its memory is the received memfd, mapped shared).
    public let restore: MachineRestore
    private let wire: MigrationWire

    private init(restore: MachineRestore, wire: MigrationWire) {
        self.restore = restore
        self.wire = wire
    }

    /// The largest guest RAM a source may announce (1 TiB, and no more than this host has).
    static func memoryLimit() -> UInt64 {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        let host = pages > 0 && size > 0 ? UInt64(pages) * UInt64(size) : 1 << 40
        return min(1 << 40, host)
    }

    /// A listening socket on `endpoint`, for `receive` (made before the process reports itself
    /// ready, so that a source may connect at once).
    public static func listen(on endpoint: MigrationEndpoint) throws -> Int32 { try endpoint.listen() }

    /// Accepts one source on `listener` (closed afterwards; a Unix socket path is removed) and
    /// receives its stream. Every field is checked; a bad stream is an error naming what was wrong,
    /// and nothing runs.
    public static func receive(listener: Int32, endpoint: MigrationEndpoint, logger: Logger) throws -> IncomingMigration {
        defer {
            close(listener)
            if case .unix(let path) = endpoint { unlink(path) }
        }
        var fd: Int32
        repeat { fd = accept(listener, nil, nil) } while fd < 0 && errno == EINTR
        guard fd >= 0 else { throw VMMError.setup("migration: accept on \(endpoint): \(String(cString: strerror(errno)))") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        MigrationWire.setTimeouts(fd)
        let wire = MigrationWire(fd: fd, peer: endpoint.description)
        func bad(_ why: String) -> VMMError { .setup("migration stream from \(endpoint): \(why)") }

        let header = try wire.receive(24)
        guard Array(header[0..<8]) == MigrationWire.magic else { throw bad("not a SwiftKVM migration stream (no SKVMMIGR header)") }
        let version = header.getLE(UInt32.self, at: 8)!
        guard version == MigrationWire.version else { throw bad("stream version \(version), this SwiftKVM reads \(MigrationWire.version)") }
        let size = header.getLE(UInt64.self, at: 16)!
        guard size > 0, size % UInt64(MigrationWire.pageSize) == 0, size <= memoryLimit() else {
            throw bad("guest RAM of \(size) bytes (must be whole pages, at most \(memoryLimit()) bytes here)")
        }
        let mem: Int32
        do { mem = try GuestMemory.makeMemfd(size: size) } catch { throw bad("\(error)") }
        var keep = false
        defer { if !keep { close(mem) } }
        guard let ram = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, mem, 0), ram != MAP_FAILED else {
            throw bad("cannot map guest RAM: \(String(cString: strerror(errno)))")
        }
        defer { munmap(ram, Int(size)) }

        var records = 0
        while true {
            let tag = try wire.receiveTag()
            switch tag {
            case MigrationWire.Tag.pages.rawValue, MigrationWire.Tag.zeros.rawValue:
                let h = try wire.receive(12)
                let offset = h.getLE(UInt64.self, at: 0)!, count = Int(h.getLE(UInt32.self, at: 8)!)
                let bytes = UInt64(count) * UInt64(MigrationWire.pageSize)
                guard count > 0, count <= MigrationWire.maxPagesPerRecord, offset % UInt64(MigrationWire.pageSize) == 0,
                      offset <= size, bytes <= size - offset else {
                    throw bad("record \(records): \(count) pages at offset \(offset) are outside guest RAM of \(size) bytes")
                }
                let target = UnsafeMutableRawBufferPointer(start: ram + Int(offset), count: Int(bytes))
                if tag == MigrationWire.Tag.zeros.rawValue {
                    // Zero the range without touching it: the memfd's pages are freed and read as zeros
                    // (writing zeros would allocate all of a mostly empty guest's RAM).
                    if madvise(target.baseAddress, target.count, MADV_REMOVE) != 0 {
                        target.initializeMemory(as: UInt8.self, repeating: 0)
                    }
                } else {
                    let crc = try wire.receive(4).getLE(UInt32.self, at: 0)!
                    try wire.receive(into: target)
                    guard MigrationWire.crc32(UnsafeRawBufferPointer(target)) == crc else {
                        throw bad("record \(records): checksum mismatch in \(count) pages at offset \(offset)")
                    }
                }
            case MigrationWire.Tag.state.rawValue:
                let length = try wire.receive(8).getLE(UInt64.self, at: 0)!
                guard length <= UInt64(SnapshotFile.maxPayload + 64) else { throw bad("a state of \(length) bytes") }
                let snapshot = try SnapshotFile.decode(try wire.receive(Int(length)), path: "the migration stream")
                guard snapshot.memorySize == size else {
                    throw bad("the state is for \(snapshot.memorySize) bytes of RAM, the stream sent \(size)")
                }
                // The disks stay on storage both sides share: the files here must be the ones the source closed.
                for f in snapshot.diskFingerprints ?? [] {
                    let problem: String?
                    do {
                        let here = try DiskFingerprint(path: f.path)
                        problem = here == f ? nil
                            : here.size != f.size ? "it has \(here.size) bytes here and \(f.size) at the source"
                            : "its first or last 64 KiB differ from the source's"
                    } catch {
                        problem = "\(error)"
                    }
                    if let problem {
                        let message = "disk \(f.path): \(problem); live migration needs the source's disk files at the same paths (shared storage)"
                        Self.refuse(wire, message)
                        throw bad(message)
                    }
                }
                keep = true
                logger.info("migration: received \(records) memory records and the state (\(snapshot.vcpus.count) vCPUs, \(snapshot.devices.count) devices)")
                return IncomingMigration(restore: MachineRestore(snapshot: snapshot, memoryPath: "/proc/self/fd/\(mem)", memoryFD: mem), wire: wire)
            default:
                throw bad("record \(records): unknown tag 0x\(String(tag, radix: 16))")
            }
            records += 1
        }
    }

    /// Tells the source the machine is built and waits for its go-ahead: true when this side
    /// must run the guest, false when the source did not say so (then it keeps the guest).
    public func confirmReady() -> Bool {
        guard (try? wire.send([MigrationWire.Tag.ready.rawValue])) != nil else { return false }
        return (try? wire.receiveTag()) == MigrationWire.Tag.go.rawValue
    }

    /// Confirms to the source that the guest runs here.
    public func reportRunning() {
        try? wire.send([MigrationWire.Tag.running.rawValue])
    }

    /// Tells the source that the machine could not be built (it resumes its guest).
    public func refuse(_ message: String) { Self.refuse(wire, message) }

    static func refuse(_ wire: MigrationWire, _ message: String) {
        let m = Array(message.utf8.prefix(4096))
        try? wire.send([MigrationWire.Tag.refused.rawValue] + withUnsafeBytes(of: UInt32(m.count).littleEndian) { Array($0) } + m)
    }
}
