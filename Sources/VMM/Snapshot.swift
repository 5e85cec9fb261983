import CZlib
import Devices
import FoundationEssentials
import GuestMemory
import KVM
#if canImport(Glibc)
import Glibc
#endif

/// One vCPU's architectural state as KVM reports it (the KVM structs' bytes).
public struct VCPUState: Codable, Sendable, Equatable {
    public var id: UInt32
    public var regs: Data
    public var sregs: Data
    public var xsave: Data
    public var xcrs: Data?
    public var debugRegs: Data?
    /// (index, value) of every MSR of `KVM_GET_MSR_INDEX_LIST` that KVM could read.
    public var msrs: [MSRValue]
    public var lapic: Data
    public var mpState: UInt32
    public var events: Data
}

/// One MSR and its value.
public struct MSRValue: Codable, Sendable, Equatable {
    public var index: UInt32
    public var value: UInt64
}

/// The VM-wide in-kernel state: the two PICs, the IOAPIC, the PIT and kvmclock.
public struct VMKernelState: Codable, Sendable, Equatable {
    public var picMaster: Data
    public var picSlave: Data
    public var ioapic: Data
    public var pit: Data
    public var clock: Data
}

/// A device's saved state: its id in the machine, its format version and the encoded state.
public struct SavedDevice: Codable, Sendable, Equatable {
    public var id: String
    public var version: UInt32
    public var state: Data
}

/// Everything a snapshot holds besides guest memory (which goes to its own file).
public struct MachineSnapshot: Codable, Sendable, Equatable {
    /// The configuration the machine was built from (a restore builds the same machine).
    public var config: VMConfiguration
    /// Size of the memory file: every guest RAM region, in address order.
    public var memorySize: UInt64
    public var vcpus: [VCPUState]
    public var vm: VMKernelState
    public var devices: [SavedDevice]
    /// Host fix-up state (e.g. the PVM SYSCALL fix-up's guest LSTAR).
    public var quirks: [String: UInt64]
    /// For a Diff snapshot: the parts of the memory file it holds (the pages written since the
    /// previous snapshot); the rest is a hole. nil: a Full snapshot.
    public var diffRanges: [MemoryRange]? = nil
    /// For a live migration: what the source's disk files looked like when it closed them, for the
    /// target to check that it opens the same files (shared storage). nil in snapshot files.
    public var diskFingerprints: [DiskFingerprint]? = nil
}

/// A byte range of a memory file.
public struct MemoryRange: Codable, Sendable, Equatable {
    public var offset: UInt64
    public var length: UInt64
    public init(offset: UInt64, length: UInt64) { self.offset = offset; self.length = length }
}

/// A snapshot file: a 32-byte header — magic `SKVMSNAP`, format version (u32), reserved (u32),
/// payload length (u64), CRC-32 of the payload (u32), reserved (u32), little-endian — then the
/// payload, `MachineSnapshot` as JSON. docs/SNAPSHOT.md describes it.
public enum SnapshotFile {
    public static let magic = Array("SKVMSNAP".utf8)
    public static let version: UInt32 = 1
    static let headerSize = 32
    /// The largest payload read (a snapshot of 64 vCPUs is well under 4 MiB).
    public static let maxPayload = 64 << 20

    /// The file's bytes for `snapshot`.
    public static func encode(_ snapshot: MachineSnapshot) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let payload = [UInt8](try encoder.encode(snapshot))
        var header = [UInt8](repeating: 0, count: headerSize)
        header.replaceSubrange(0..<8, with: magic)
        header.putLE(version, at: 8)
        header.putLE(UInt64(payload.count), at: 16)
        header.putLE(crc32(payload), at: 24)
        return header + payload
    }

    /// The format version in the header of the snapshot file at `path` (only the header is read, and checked).
    public static func formatVersion(of path: String) throws -> UInt32 {
        func bad(_ why: String) -> VMMError { .invalidValue(what: "snapshot file", value: path, reason: why) }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw bad(String(cString: strerror(errno))) }
        defer { close(fd) }
        var header = [UInt8](repeating: 0, count: headerSize)
        let n = header.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, headerSize) }
        guard n == headerSize, Array(header[0..<8]) == magic, let v = header.getLE(UInt32.self, at: 8) else {
            throw bad("not a SwiftKVM snapshot (no SKVMSNAP header)")
        }
        return v
    }

    /// The snapshot in `bytes` (the whole file); errors name what is wrong in `path`.
    public static func decode(_ bytes: [UInt8], path: String) throws -> MachineSnapshot {
        func bad(_ why: String) -> VMMError { .invalidValue(what: "snapshot file", value: path, reason: why) }
        guard bytes.count >= headerSize, Array(bytes[0..<8]) == magic else {
            throw bad("not a SwiftKVM snapshot (no SKVMSNAP header)")
        }
        let v = bytes.getLE(UInt32.self, at: 8)!
        guard v == version else { throw bad("format version \(v), this SwiftKVM reads version \(version)") }
        let length = bytes.getLE(UInt64.self, at: 16)!
        guard length == UInt64(bytes.count - headerSize) else {
            throw bad("payload of \(bytes.count - headerSize) bytes, the header says \(length) (truncated or extended)")
        }
        let payload = Array(bytes[headerSize...])
        guard crc32(payload) == bytes.getLE(UInt32.self, at: 24)! else { throw bad("checksum mismatch (the file is corrupted)") }
        do {
            return try JSONDecoder().decode(MachineSnapshot.self, from: Data(payload))
        } catch {
            throw bad("unreadable state: \(error)")
        }
    }

    /// Reads and decodes the snapshot at `path`.
    public static func read(_ path: String) throws -> MachineSnapshot {
        let bytes = try SnapshotIO.readAll(path, limit: maxPayload + headerSize, what: "snapshot file")
        return try decode(bytes, path: path)
    }

    static func crc32(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBufferPointer { UInt32(CZlib.crc32(0, $0.baseAddress, uInt($0.count))) }
    }
}

/// File helpers for snapshots, with errors that name the path.
public enum SnapshotIO {
    static func fail(_ what: String, _ path: String, _ reason: String) -> VMMError {
        .invalidValue(what: what, value: path, reason: reason)
    }

    static func readAll(_ path: String, limit: Int, what: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw fail(what, path, String(cString: strerror(errno))) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { throw fail(what, path, "not a regular file") }
        guard st.st_size <= limit else { throw fail(what, path, "\(st.st_size) bytes, more than the \(limit)-byte limit") }
        var out = [UInt8](repeating: 0, count: Int(st.st_size))
        var done = 0
        while done < out.count {
            let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw fail(what, path, n == 0 ? "file shrank while reading" : String(cString: strerror(errno))) }
            done += n
        }
        return out
    }

    /// Writes `path` through a temporary file beside it: `body` fills the file, which is then
    /// fsynced and renamed over `path`. On any error the temporary file is removed.
    static func replace(_ path: String, what: String, _ body: (Int32) throws -> Void) throws {
        let temp = path + ".tmp-\(getpid())"
        let fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw fail(what, path, String(cString: strerror(errno))) }
        var ok = false
        defer { if !ok { unlink(temp) } }
        do {
            try body(fd)
            guard fsync(fd) == 0 else { throw fail(what, path, "fsync: \(String(cString: strerror(errno)))") }
        } catch {
            close(fd)
            throw error
        }
        close(fd)
        guard rename(temp, path) == 0 else { throw fail(what, path, "rename: \(String(cString: strerror(errno)))") }
        ok = true
    }

    /// Writes `bytes` to `path` through a temporary file, fsync and rename.
    static func writeAtomically(_ bytes: [UInt8], to path: String, what: String) throws {
        try replace(path, what: what) { fd in try writeFully(fd, bytes.withUnsafeBytes { $0 }, at: 0, what: what, path: path) }
    }

    static func writeFully(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: UInt64, what: String, path: String) throws {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw fail(what, path, String(cString: strerror(errno))) }
            done += n
        }
    }

    /// Writes guest RAM to `path`, region after region; all-zero 64 KiB blocks are left as holes.
    static func writeMemory(_ memory: GuestMemory, to path: String) throws {
        let what = "memory file"
        try replace(path, what: what) { fd in
            guard ftruncate(fd, off_t(memory.totalSize)) == 0 else {
                throw fail(what, path, "cannot size it to \(memory.totalSize) bytes: \(String(cString: strerror(errno)))")
            }
            var offset: UInt64 = 0
            let block = 64 << 10
            let page = Int(sysconf(Int32(_SC_PAGESIZE)))
            for region in memory.regions {
                // Pages the guest never touched are not resident (mincore): they read as zero, so
                // they are skipped without reading them (which would map them).
                var resident = [UInt8](repeating: 1, count: (Int(region.size) + page - 1) / page)
                if mincore(region.host, Int(region.size), &resident) != 0 { resident = resident.map { _ in 1 } }
                var o = 0
                while o < Int(region.size) {
                    let n = min(block, Int(region.size) - o)
                    let first = o / page, last = (o + n - 1) / page
                    if resident[first...last].contains(where: { $0 & 1 != 0 }) {
                        let chunk = UnsafeRawBufferPointer(start: region.host + o, count: n)
                        if !isZero(chunk) { try writeFully(fd, chunk, at: offset + UInt64(o), what: what, path: path) }
                    }
                    o += n
                }
                offset += region.size
            }
        }
    }

    /// Writes the pages set in `dirty` (per region, one bit per 4 KiB page) at their offsets of a
    /// memory file of guest RAM's size; the rest stays a hole. Returns the ranges written. Pages
    /// are written even when all zero: a merge copies exactly these ranges.
    static func writeDiffMemory(_ memory: GuestMemory, dirty: [[UInt64]], to path: String) throws -> [MemoryRange] {
        let what = "memory file"
        var ranges: [MemoryRange] = []
        try replace(path, what: what) { fd in
            guard ftruncate(fd, off_t(memory.totalSize)) == 0 else {
                throw fail(what, path, "cannot size it to \(memory.totalSize) bytes: \(String(cString: strerror(errno)))")
            }
            let page = DirtyPageLog.pageSize
            var fileOffset: UInt64 = 0
            for (i, region) in memory.regions.enumerated() {
                let pages = region.size / page
                var p: UInt64 = 0
                while p < pages {
                    guard i < dirty.count, dirty[i][Int(p / 64)] & (1 << (p % 64)) != 0 else { p += 1; continue }
                    var q = p + 1
                    while q < pages, dirty[i][Int(q / 64)] & (1 << (q % 64)) != 0 { q += 1 }
                    let chunk = UnsafeRawBufferPointer(start: region.host + Int(p * page), count: Int((q - p) * page))
                    try writeFully(fd, chunk, at: fileOffset + p * page, what: what, path: path)
                    ranges.append(MemoryRange(offset: fileOffset + p * page, length: (q - p) * page))
                    p = q
                }
                fileOffset += region.size
            }
        }
        return ranges
    }

    /// Copies the ranges a Diff snapshot holds from its memory file onto the memory file of its base
    /// (Firecracker's rebase-snap), which then matches the Diff's state file. Both files must be
    /// the snapshot's memory size. The base is written in place and fsynced.
    public static func mergeDiff(baseMemory: String, diffState: String, diffMemory: String) throws -> (ranges: Int, bytes: UInt64) {
        let snapshot = try SnapshotFile.read(diffState)
        guard let ranges = snapshot.diffRanges else {
            throw fail("snapshot file", diffState, "a Full snapshot, not a Diff: there is nothing to merge")
        }
        func openSized(_ path: String, _ flags: Int32, _ what: String) throws -> Int32 {
            let fd = open(path, flags | O_CLOEXEC)
            guard fd >= 0 else { throw fail(what, path, String(cString: strerror(errno))) }
            var st = stat()
            guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, UInt64(st.st_size) == snapshot.memorySize else {
                close(fd)
                throw fail(what, path, "not a regular file of the snapshot's \(snapshot.memorySize) bytes of guest RAM")
            }
            return fd
        }
        let src = try openSized(diffMemory, O_RDONLY, "diff memory file")
        defer { close(src) }
        let dst = try openSized(baseMemory, O_WRONLY, "base memory file")
        defer { close(dst) }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var total: UInt64 = 0
        for r in ranges {
            guard r.offset.addingReportingOverflow(r.length).partialValue <= snapshot.memorySize, r.length > 0 else {
                throw fail("snapshot file", diffState, "diff range at \(r.offset) of \(r.length) bytes is outside guest RAM")
            }
            var done: UInt64 = 0
            while done < r.length {
                let n = Int(min(UInt64(buffer.count), r.length - done))
                let got = buffer.withUnsafeMutableBytes { pread(src, $0.baseAddress, n, off_t(r.offset + done)) }
                guard got == n else { throw fail("diff memory file", diffMemory, got < 0 ? String(cString: strerror(errno)) : "short read at \(r.offset + done)") }
                try buffer.withUnsafeBytes { try writeFully(dst, UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: r.offset + done, what: "base memory file", path: baseMemory) }
                done += UInt64(n)
            }
            total += r.length
        }
        guard fsync(dst) == 0 else { throw fail("base memory file", baseMemory, "fsync: \(String(cString: strerror(errno)))") }
        return (ranges.count, total)
    }

    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        for i in 0..<words where bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        for i in (words * 8)..<bytes.count where bytes[i] != 0 { return false }
        return true
    }

    /// Maps guest RAM received into `fd` over the machine's RAM, shared (the memfd is the RAM from
    /// then on); closes `fd` (the mappings keep the memory).
    static func mapShared(fd: Int32, over memory: GuestMemory, what: String) throws {
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, UInt64(st.st_size) == memory.totalSize else {
            throw fail("received memory", what, "\(st.st_size) bytes, the machine's guest RAM is \(memory.totalSize) bytes")
        }
        var offset: UInt64 = 0
        for region in memory.regions {
            let p = mmap(region.host, Int(region.size), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, off_t(offset))
            guard p == region.host else { throw fail("received memory", what, "cannot map it: \(String(cString: strerror(errno)))") }
            offset += region.size
        }
    }

    /// Maps the memory file over guest RAM copy-on-write (`MAP_PRIVATE | MAP_FIXED`): pages load
    /// lazily, and machines restored from one file share its unmodified pages.
    static func mapMemory(_ path: String, over memory: GuestMemory) throws {
        let what = "memory file"
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw fail(what, path, String(cString: strerror(errno))) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { throw fail(what, path, "not a regular file") }
        guard UInt64(st.st_size) == memory.totalSize else {
            throw fail(what, path, "\(st.st_size) bytes, the snapshot's guest RAM is \(memory.totalSize) bytes")
        }
        var offset: UInt64 = 0
        for region in memory.regions {
            let p = mmap(region.host, Int(region.size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, off_t(offset))
            guard p == region.host else { throw fail(what, path, "cannot map it: \(String(cString: strerror(errno)))") }
            offset += region.size
        }
    }
}

/// The machine's stateful devices by id, in the order they were added: what a snapshot saves and
/// a restore puts back.
final class DeviceManager: @unchecked Sendable {
    private struct Entry {
        let id: String
        let version: UInt32
        let save: () throws -> Data
        let restore: (Data) throws -> Void
    }
    private var entries: [Entry] = []

    /// Adds `device` under `id` (ids are unique within a machine).
    func register<D: StatefulDevice>(_ device: D, id: String) {
        precondition(!entries.contains { $0.id == id }, "device id \(id) registered twice")
        entries.append(Entry(id: id, version: D.stateVersion, save: {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys] // the same state gives the same bytes
            return try encoder.encode(device.saveState())
        }, restore: { data in
            let state: D.SavedState
            do { state = try JSONDecoder().decode(D.SavedState.self, from: data) } catch {
                throw VMMError.invalidConfiguration("snapshot: device \(id): unreadable state: \(error)")
            }
            do throws(DeviceStateError) { try device.restoreState(state) } catch {
                throw VMMError.invalidConfiguration("snapshot: device \(id): \(error.description)")
            }
        }))
    }

    /// Every registered device's state, in registration order.
    func save() throws -> [SavedDevice] {
        return try entries.map { SavedDevice(id: $0.id, version: $0.version, state: try $0.save()) }
    }

    /// Restores `saved`, which must name exactly the registered devices with their versions.
    func restore(_ saved: [SavedDevice]) throws {
        let ids = entries.map(\.id), savedIDs = saved.map(\.id)
        guard Set(ids) == Set(savedIDs), ids.count == savedIDs.count else {
            throw VMMError.invalidConfiguration("snapshot: devices \(savedIDs.joined(separator: ", ")) do not match this machine's \(ids.joined(separator: ", "))")
        }
        for e in entries {
            let s = saved.first { $0.id == e.id }!
            guard s.version == e.version else {
                throw VMMError.invalidConfiguration("snapshot: device \(e.id) state version \(s.version), this SwiftKVM reads \(e.version)")
            }
            try e.restore(s.state)
        }
    }
}

extension VCPUManager {
    /// The state of every vCPU (the threads must be parked or not started).
    func saveStates(msrIndices: [UInt32]) throws -> [VCPUState] {
        try vcpus.map { v in
            VCPUState(id: v.id,
                      regs: Data(KVMBlob.bytes(of: try v.getRegs())),
                      sregs: Data(KVMBlob.bytes(of: try v.getSregs())),
                      xsave: Data(KVMBlob.bytes(of: try v.getXSAVE())),
                      xcrs: (try? v.getXCRS()).map { Data(KVMBlob.bytes(of: $0)) },
                      debugRegs: (try? v.getDebugRegs()).map { Data(KVMBlob.bytes(of: $0)) },
                      msrs: try Self.readMSRs(v, msrIndices),
                      lapic: Data(KVMBlob.bytes(of: try v.getLAPIC())),
                      mpState: try v.getMPState(),
                      events: Data(KVMBlob.bytes(of: try v.getVCPUEvents())))
        }
    }

    /// Every MSR of `indices` KVM can read (KVM_GET_MSRS stops at the first it cannot: skip it).
    static func readMSRs(_ v: VCPU, _ indices: [UInt32]) throws -> [MSRValue] {
        var out: [MSRValue] = []
        var rest = indices[...]
        while !rest.isEmpty {
            let got = try v.getMSRs(Array(rest))
            out += got.map { MSRValue(index: $0.index, value: $0.value) }
            rest = rest.dropFirst(got.count + 1)
        }
        return out
    }

    /// Puts saved vCPU states back (before the threads start).
    func restoreStates(_ states: [VCPUState]) throws {
        guard states.count == vcpus.count else {
            throw VMMError.invalidConfiguration("snapshot: \(states.count) vCPU states for \(vcpus.count) vCPUs")
        }
        for (v, s) in zip(vcpus, states) {
            func blob<T>(_ data: Data?, _ zero: T, _ name: String) throws -> T? {
                guard let data else { return nil }
                guard let value = KVMBlob.value(T.self, from: [UInt8](data), zero: zero) else {
                    throw VMMError.invalidConfiguration("snapshot: vCPU \(s.id) \(name): \(data.count) bytes, expected \(MemoryLayout<T>.size)")
                }
                return value
            }
            // Mode (sregs) before regs; the LAPIC before the MSRs: KVM ignores a write of IA32_TSC_DEADLINE
            // unless the LAPIC timer is already in TSC-deadline mode, and setting the LAPIC afterwards
            // would disarm it (a restored Linux then waits for a timer that never fires).
            if let x = try blob(s.xsave, kvm_xsave(), "xsave") { try v.setXSAVE(x) }
            if let x = try blob(s.xcrs, kvm_xcrs(), "xcrs") { try v.setXCRS(x) }
            if let x = try blob(s.sregs, kvm_sregs(), "sregs") { try v.setSregs(x) }
            if let x = try blob(s.regs, kvm_regs(), "regs") { try v.setRegs(x) }
            if let x = try blob(s.lapic, kvm_lapic_state(), "lapic") { try v.setLAPIC(x) }
            for m in s.msrs {
                // An MSR this host's KVM refuses is skipped.
                try? v.setMSRs([(m.index, m.value)])
            }
            try v.setMPState(s.mpState)
            if let x = try blob(s.events, kvm_vcpu_events(), "events") { try v.setVCPUEvents(x) }
            if let x = try blob(s.debugRegs, kvm_debugregs(), "debugregs") { try v.setDebugRegs(x) }
        }
    }
}

extension VirtualMachine {
    /// The in-kernel irqchip, PIT and clock.
    func saveKernelState() throws -> VMKernelState {
        VMKernelState(picMaster: Data(KVMBlob.bytes(of: try getIRQChip(.picMaster))),
                      picSlave: Data(KVMBlob.bytes(of: try getIRQChip(.picSlave))),
                      ioapic: Data(KVMBlob.bytes(of: try getIRQChip(.ioapic))),
                      pit: Data(KVMBlob.bytes(of: try getPIT2())),
                      clock: Data(KVMBlob.bytes(of: try getClock())))
    }

    func restoreKernelState(_ s: VMKernelState) throws {
        func blob<T>(_ data: Data, _ zero: T, _ name: String) throws -> T {
            guard let value = KVMBlob.value(T.self, from: [UInt8](data), zero: zero) else {
                throw VMMError.invalidConfiguration("snapshot: \(name): \(data.count) bytes, expected \(MemoryLayout<T>.size)")
            }
            return value
        }
        for (data, id) in [(s.picMaster, IRQChipID.picMaster), (s.picSlave, .picSlave), (s.ioapic, .ioapic)] {
            let chip = try blob(data, kvm_irqchip(), "irqchip \(id)")
            guard chip.chip_id == id.rawValue else {
                throw VMMError.invalidConfiguration("snapshot: irqchip \(id) holds chip \(chip.chip_id)")
            }
            try setIRQChip(chip)
        }
        try setPIT2(try blob(s.pit, kvm_pit_state2(), "pit"))
        try setClock(try blob(s.clock, kvm_clock_data(), "clock"))
    }
}

/// A snapshot directory, as `swiftkvm vm save` writes it and `swiftkvm run --restore` and
/// `swiftkvm vm restore` read it: the state file `snapshot` and the guest memory file `memory`.
public struct SnapshotDirectory: Sendable {
    public let path: String
    public init(_ path: String) { self.path = path }
    /// The state file (SnapshotFile).
    public var statePath: String { path + "/snapshot" }
    /// The guest memory file (mapped copy-on-write by a restore).
    public var memoryPath: String { path + "/memory" }

    /// Reads the state file and checks that the memory file is there: what `Machine(…restoring:)` needs.
    public func load() throws -> MachineRestore {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
            throw VMMError.invalidValue(what: "snapshot directory", value: path, reason: "not a directory")
        }
        let snapshot = try SnapshotFile.read(statePath)
        guard access(memoryPath, R_OK) == 0 else {
            throw VMMError.invalidValue(what: "snapshot directory", value: path, reason: "no readable memory file 'memory' in it")
        }
        return MachineRestore(snapshot: snapshot, memoryPath: memoryPath)
    }
}

/// A snapshot to build a machine from (`Machine.init(…restoring:)`).
public struct MachineRestore: Sendable {
    public var snapshot: MachineSnapshot
    /// The guest memory file written with the snapshot (mapped copy-on-write).
    public var memoryPath: String
    /// Instead: guest RAM already in this memfd (a migration's), mapped shared; the machine owns it.
    public var memoryFD: Int32?
    public init(snapshot: MachineSnapshot, memoryPath: String, memoryFD: Int32? = nil) {
        self.snapshot = snapshot
        self.memoryPath = memoryPath
        self.memoryFD = memoryFD
    }
}

extension Machine {
    /// Whether the machine logs dirty pages (Diff snapshots are possible).
    public var tracksDirtyPages: Bool { config.trackDirtyPages == true }

    /// Writes a snapshot of the paused machine: its state to `statePath` and guest RAM to
    /// `memoryPath` (both replaced atomically). A Full snapshot holds all of RAM; a Diff snapshot
    /// (`diff`, with dirty-page tracking and a base: a previous snapshot or the loaded one) holds
    /// only the pages the guest or a device wrote since the previous snapshot, the rest being holes,
    /// and lists them in `diffRanges`. Throws, writing nothing, when the machine is not paused, when
    /// a Diff has no base, or when a device's state cannot be saved.
    public func saveSnapshot(statePath: String, memoryPath: String, diff: Bool = false) throws {
        guard isPaused else { throw VMMError.invalidConfiguration("a snapshot needs a paused machine") }
        if diff {
            guard tracksDirtyPages else {
                throw VMMError.invalidConfiguration("Diff snapshots need dirty page tracking (machine-config track_dirty_pages, or track_dirty_pages in snapshot/load)")
            }
            guard dirtyBaseline.load(ordering: .acquiring) else {
                throw VMMError.invalidConfiguration("a Diff snapshot needs a base: take a Full snapshot first (or load one)")
            }
        }
        // Device threads stand still while their state and guest memory are read, and stay still until the
        // machine resumes (`resume()`): the disk images then stay as the snapshot left them, so a copy made
        // meanwhile (`vm clone`) matches it. A second snapshot while paused finds them held already.
        if !devicesHeldBySnapshot.exchange(true, ordering: .acquiringAndReleasing) { virtio.quiesce() }
        var snapshot = try captureState()
        // The image files hold what the guest wrote up to here (a clone may copy them now).
        try virtio.flushDisks()
        // The pages written since the previous snapshot: taking them starts the next interval. If this
        // snapshot then fails, a Diff must not follow it (its pages would be missing).
        let dirty = tracksDirtyPages ? try dirtyPages() : nil
        dirtyBaseline.store(false, ordering: .releasing)
        if diff, let dirty {
            snapshot.diffRanges = try SnapshotIO.writeDiffMemory(memory, dirty: dirty, to: memoryPath)
        } else {
            try SnapshotIO.writeMemory(memory, to: memoryPath)
        }
        let bytes = try SnapshotFile.encode(snapshot)
        try SnapshotIO.writeAtomically(bytes, to: statePath, what: "snapshot file")
        if tracksDirtyPages { dirtyBaseline.store(true, ordering: .releasing) }
        let held = snapshot.diffRanges.map { $0.reduce(0) { $0 + $1.length } } ?? memory.totalSize
        logger.info("snapshot (\(diff ? "Diff" : "Full")): \(snapshot.vcpus.count) vCPUs, \(snapshot.devices.count) devices, \(bytes.count) bytes of state to \(statePath), \(held) of \(memory.totalSize) bytes of memory to \(memoryPath)")
    }

    /// Everything but memory, of a paused machine whose devices are quiesced.
    func captureState() throws -> MachineSnapshot {
        // The disks as they are now: PATCH /drives may have swapped an image since the machine was built.
        var config = config
        for i in virtio.diskIndices where i < config.disks.count {
            if let disk = virtio.disk(i) { config.disks[i] = disk.spec }
        }
        return MachineSnapshot(config: config, memorySize: memory.totalSize,
                        vcpus: try vcpuManager.saveStates(msrIndices: try kvm.msrIndexList()),
                        vm: try vm.saveKernelState(), devices: try devices.save(), quirks: quirks.savedState)
    }

    /// Per RAM region, the pages written since the last call: KVM's log of guest writes ORed with
    /// the devices' log.
    func dirtyPages() throws -> [[UInt64]] {
        var maps = memory.dirtyLog.take()
        for (i, region) in memory.regions.enumerated() {
            let kvmLog: [UInt64]
            do { kvmLog = try vm.getDirtyLog(slot: UInt32(i), size: region.size) } catch {
                throw VMMError.setup("this host's KVM does not return the dirty-page log: \(error)")
            }
            for w in 0..<min(kvmLog.count, maps[i].count) { maps[i][w] |= kvmLog[w] }
        }
        return maps
    }

    /// Puts the snapshot's state into this freshly built machine (from init).
    func restore(_ r: MachineRestore) throws {
        // Memory first: a live virtio device restores onto rings in guest RAM.
        if let fd = r.memoryFD {
            try SnapshotIO.mapShared(fd: fd, over: memory, what: r.memoryPath)
        } else {
            try SnapshotIO.mapMemory(r.memoryPath, over: memory)
        }
        // KSM and huge-page advice belongs to the mapping: the new one needs it again.
        if let backend = config.memoryBackend { memory.advise(backend) }
        try vm.restoreKernelState(r.snapshot.vm)
        try vcpuManager.restoreStates(r.snapshot.vcpus)
        try devices.restore(r.snapshot.devices)
        // BARs the guest moved: map them where the restored configuration spaces say.
        for d in pci.root.devices { pci.root.refresh(slot: d.slot) }
        quirks.restore(r.snapshot.quirks)
        logger.info("restored: \(r.snapshot.vcpus.count) vCPUs, \(r.snapshot.devices.count) devices, memory mapped from \(r.memoryPath)")
    }
}
