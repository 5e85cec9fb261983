#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// QEMU's image locking protocol (block/file-posix.c), so that SwiftKVM, qemu-img, qemu-io and a running QEMU keep
/// each other from writing an image another one uses.
///
/// Each holder takes shared open-file-description locks (`F_OFD_SETLK`, `F_RDLCK`) on single bytes of the file:
/// byte `100 + i` while it holds permission bit `i`, byte `200 + i` while it does not share that permission with
/// others. Locks are applied first, then checked with `F_OFD_GETLK` (a write lock that would conflict): a permission
/// it wants is refused when anyone locks its byte at 200 ("Failed to get \"write\" lock"), and a permission it does
/// not share is refused when anyone holds it at 100 ("Failed to get shared \"write\" lock"). The locks belong to the
/// open file description, so they go away when the holder closes the file or exits, and two holders in one process
/// conflict as two processes would.
public final class ImageLock: @unchecked Sendable {
    /// QEMU's block permissions (`BLK_PERM_*`); bit `i` is locked at byte 100 + i (held) or 200 + i (not shared).
    public struct Permissions: OptionSet, Sendable, Hashable, CustomStringConvertible {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// Reads see consistent data.
        public static let consistentRead = Permissions(rawValue: 1 << 0)
        /// Writes that change the data.
        public static let write = Permissions(rawValue: 1 << 1)
        /// Writes that leave the data as it was.
        public static let writeUnchanged = Permissions(rawValue: 1 << 2)
        /// Changing the file's size.
        public static let resize = Permissions(rawValue: 1 << 3)
        /// Every permission qemu 7.2 locks.
        public static let all: Permissions = [.consistentRead, .write, .writeUnchanged, .resize]
        /// qemu's names (`bdrv_perm_names`), by bit.
        static let names = ["consistent read", "write", "write unchanged", "resize"]
        public var description: String {
            (0..<Self.names.count).filter { rawValue & (1 << $0) != 0 }.map { Self.names[$0] }.joined(separator: ", ")
        }
    }

    /// The first byte of the held-permission locks.
    public static let permissionBase: Int = 100
    /// The first byte of the not-shared-permission locks.
    public static let sharedBase: Int = 200

    /// The locked file, as given.
    public let path: String
    private struct State {
        var fd: Int32
        var permissions: Permissions = []
        var unshared: Permissions = []
    }
    private let state: Mutex<State>

    /// Opens `path` (creating it when `create` is set, never truncating it), locks it and checks for conflicts.
    /// Throws a `.locked` error that names the file and the conflicting permission, or an `.io` error.
    public init(path: String, permissions: Permissions, unshared: Permissions, create: Bool = false) throws {
        self.path = path
        let fd = open(path, O_RDONLY | O_CLOEXEC | (create ? O_CREAT : 0), 0o644)
        guard fd >= 0 else {
            let e = errno
            throw DiskImageError(.io, "cannot open \(path) to lock it: \(String(cString: strerror(e)))", errno: e)
        }
        state = Mutex(State(fd: fd))
        do {
            try update(permissions: permissions, unshared: unshared)
        } catch {
            release()
            throw error
        }
    }

    deinit { release() }

    /// The permissions held and not shared now.
    public var current: (permissions: Permissions, unshared: Permissions) {
        state.withLock { ($0.permissions, $0.unshared) }
    }

    /// Changes the held and unshared permissions (qemu's reopen, e.g. commit taking "write" on its base); on a
    /// conflict the previous locks are restored and the error thrown.
    public func update(permissions: Permissions, unshared: Permissions) throws {
        try state.withLock { s in
            guard s.fd >= 0 else { throw DiskImageError.invalid("\(path): the image lock was released") }
            let old = (s.permissions, s.unshared)
            do {
                try apply(&s, permissions, unshared)
                try check(s.fd, permissions, unshared)
            } catch {
                try? apply(&s, old.0, old.1)
                throw error
            }
        }
    }

    /// Changes the locks to those of a file of `format` opened for `request` (see `update(permissions:unshared:)`).
    public func update(for request: ImageLockRequest, format: ImageFormat) throws {
        let (p, u) = request.fileLocks(format: format)
        try update(permissions: p, unshared: u)
    }

    /// Releases every lock (closing the lock's file description); later calls do nothing.
    public func release() {
        state.withLock { s in
            if s.fd >= 0 { close(s.fd) }
            s.fd = -1
            s.permissions = []
            s.unshared = []
        }
    }

    private func apply(_ s: inout State, _ permissions: Permissions, _ unshared: Permissions) throws {
        for (base, want, have) in [(Self.permissionBase, permissions, s.permissions), (Self.sharedBase, unshared, s.unshared)] {
            for bit in 0..<Permissions.names.count {
                let p = Permissions(rawValue: 1 << bit)
                guard want.contains(p) != have.contains(p) else { continue }
                var fl = Glibc.flock()
                fl.l_type = Int16(want.contains(p) ? F_RDLCK : F_UNLCK)
                fl.l_whence = Int16(SEEK_SET)
                fl.l_start = off_t(base + bit)
                fl.l_len = 1
                if fcntl(s.fd, Self.F_OFD_SETLK, &fl) != 0 {
                    let e = errno
                    throw DiskImageError(.io, "\(path): cannot lock byte \(base + bit): \(String(cString: strerror(e)))", errno: e)
                }
                if base == Self.permissionBase { s.permissions.formSymmetricDifference(p) } else { s.unshared.formSymmetricDifference(p) }
            }
        }
    }

    /// qemu's `raw_check_lock_bytes`: every wanted permission against the others' not-shared bytes, then every
    /// unshared permission against the others' held bytes.
    private func check(_ fd: Int32, _ permissions: Permissions, _ unshared: Permissions) throws {
        for (base, set, shared) in [(Self.sharedBase, permissions, false), (Self.permissionBase, unshared, true)] {
            for bit in 0..<Permissions.names.count where set.contains(Permissions(rawValue: 1 << bit)) {
                var fl = Glibc.flock()
                fl.l_type = Int16(F_WRLCK)
                fl.l_whence = Int16(SEEK_SET)
                fl.l_start = off_t(base + bit)
                fl.l_len = 1
                if fcntl(fd, Self.F_OFD_GETLK, &fl) != 0 {
                    let e = errno
                    throw DiskImageError(.io, "\(path): cannot test the lock on byte \(base + bit): \(String(cString: strerror(e)))", errno: e)
                }
                if fl.l_type != Int16(F_UNLCK) {
                    throw DiskImageError(.locked, "Failed to get \(shared ? "shared " : "")\"\(Permissions.names[bit])\" lock\nIs another process using the image [\(path)]?")
                }
            }
        }
    }

    /// The bytes of `path` that anyone on this host holds an OFD lock on (from /proc/locks): what `qemu-img`, QEMU
    /// or SwiftKVM holds there, for diagnostics and tests. Empty when the file or /proc/locks cannot be read.
    public static func heldBytes(path: String) -> Set<Int> {
        var st = stat()
        guard stat(path, &st) == 0, let f = fopen("/proc/locks", "r") else { return [] }
        defer { fclose(f) }
        var bytes = Set<Int>()
        var line: UnsafeMutablePointer<CChar>?
        var cap = 0
        defer { free(line) }
        let dev = UInt64(st.st_dev)
        let major = (dev >> 8) & 0xfff | (dev >> 32) & ~0xfff, minor = dev & 0xff | (dev >> 12) & ~0xff
        let id = String(major, radix: 16).leftPadded(2) + ":" + String(minor, radix: 16).leftPadded(2) + ":\(st.st_ino)"
        // "1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101"
        while getline(&line, &cap, f) > 0, let line {
            let fields = String(cString: line).split(whereSeparator: { $0 == " " || $0 == "\n" })
            guard fields.count >= 8, fields[1] == "OFDLCK", fields[5] == Substring(id),
                  let a = Int(fields[6]), let b = Int(fields[7]), a <= b else { continue }
            bytes.formUnion(a...b)
        }
        return bytes
    }

    // <fcntl.h> defines these only with _GNU_SOURCE.
    static let F_OFD_GETLK: Int32 = 36
    static let F_OFD_SETLK: Int32 = 37
}

/// What a user of an image asks for, as qemu's block layer does (a BlockBackend's permissions and the ones it
/// shares); `lockImageChain` turns it into the locks of every file in the backing chain.
public struct ImageLockRequest: Sendable, Equatable {
    /// Permissions wanted.
    public var permissions: ImageLock.Permissions
    /// Permissions others may hold meanwhile.
    public var shared: ImageLock.Permissions
    /// qemu's force-share (`-U`): read-only use that leaves everything to others and locks at most "consistent
    /// read".
    public var forceShare: Bool

    /// Creates a request.
    public init(permissions: ImageLock.Permissions, shared: ImageLock.Permissions = .all, forceShare: Bool = false) {
        self.permissions = permissions; self.shared = shared; self.forceShare = forceShare
    }

    /// `qemu-img info`: no I/O, so no permission; qcow2 still keeps writers out while its metadata is read.
    public static func info(forceShare: Bool = false) -> Self { .init(permissions: [], forceShare: forceShare) }
    /// A read-only qemu-img command (check, map, compare, snapshot -l, bench).
    public static func read(forceShare: Bool = false) -> Self { .init(permissions: .consistentRead, forceShare: forceShare) }
    /// qemu-img convert's source: read, and no writer or resizer meanwhile.
    public static func convertSource(forceShare: Bool = false) -> Self {
        .init(permissions: .consistentRead, shared: [.consistentRead, .writeUnchanged], forceShare: forceShare)
    }
    /// A qemu-img command that writes the image (resize, snapshot, check -r, commit, rebase, convert's target).
    public static let write = Self(permissions: [.consistentRead, .write, .resize])
    /// A virtio-blk disk of a running guest, as QEMU's block device takes it: read (and write), sharing reads and
    /// resizes but no other writer.
    public static func guestDisk(readOnly: Bool) -> Self {
        .init(permissions: readOnly ? .consistentRead : [.consistentRead, .write],
              shared: [.consistentRead, .writeUnchanged, .resize])
    }

    /// The locks of a file of `format` opened for this request: raw passes the request through; qcow2 also takes
    /// resize when it writes and never shares write or resize (its metadata must not change underneath it).
    func fileLocks(format: ImageFormat) -> (permissions: ImageLock.Permissions, unshared: ImageLock.Permissions) {
        if forceShare { return (permissions.intersection(.consistentRead), []) }
        var p = permissions, u = ImageLock.Permissions.all.subtracting(shared)
        if format == .qcow2 {
            if p.contains(.write) { p.insert(.resize) }
            u.formUnion([.write, .resize])
        }
        return (p, u)
    }

    /// The request for a backing file (opened read-only): read, and sharing write and resize only when the user of
    /// the overlay shares write (qemu's `bdrv_default_perms_for_cow`).
    var backing: ImageLockRequest {
        ImageLockRequest(permissions: permissions.intersection(.consistentRead),
                         shared: shared.contains(.write) ? .all : [.consistentRead, .writeUnchanged],
                         forceShare: forceShare)
    }
}

/// Locks the image at `path` for `request`, then (when `followBacking` and the image is qcow2) each backing file in
/// its chain for the backing request, as qemu locks a chain it opens. Returns the locks, top first; they are
/// released when released or deinitialized. A conflict throws a `.locked` error "Could not open 'PATH': Failed to
/// get …"; a backing chain that cannot be read is not an error here (opening the image reports it).
public func lockImageChain(path: String, format: ImageFormat? = nil, request: ImageLockRequest,
                           followBacking: Bool = true) throws -> [ImageLock] {
    var locks: [ImageLock] = []
    var current: (path: String, format: ImageFormat?)? = (path, format)
    var request = request
    var visited: [String] = []
    while let (p, f) = current {
        let top = locks.isEmpty
        // A backing file that cannot be probed or opened is left to the open, which names the problem.
        guard let fmt = try f ?? (top ? probeImageFormat(path: p) : try? probeImageFormat(path: p)) else { break }
        let (perm, unshared) = request.fileLocks(format: fmt)
        do {
            locks.append(try ImageLock(path: p, permissions: perm, unshared: unshared))
        } catch let e as DiskImageError where e.kind == .locked {
            locks.forEach { $0.release() }
            throw DiskImageError(.locked, "Could not open '\(p)': \(e.message)")
        } catch where !top {
            break
        }
        visited.append(ImagePath.resolved(p))
        current = nil
        guard followBacking, fmt == .qcow2, visited.count < Qcow2Limits.maxBackingDepth,
              let (name, bfmt) = try? Qcow2Header.backingFile(of: p) else { break }
        let full = ImagePath.backing(name, of: p)
        guard !visited.contains(ImagePath.resolved(full)) else { break }
        current = (full, bfmt.flatMap(ImageFormat.init(rawValue:)))
        request = request.backing
    }
    return locks
}

private extension String {
    func leftPadded(_ n: Int) -> String { String(repeating: "0", count: max(0, n - count)) + self }
}

extension Array where Element == ImageLock {
    /// Releases every lock in the array (call it where the locks must end: a lock not used after its last mention
    /// may be deinitialized, and so released, early).
    public func releaseAll() { forEach { $0.release() } }
}
