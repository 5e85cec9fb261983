#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Synchronization

/// The items a `FWCfg` device serves, built before the machine runs (then immutable).
///
/// Numbered items (`FWCfgItems.Key`) hold little-endian values or raw bytes; named files get keys
/// from `FWCfgItems.Key.fileFirst` (0x20) on, in the order of their names, and are listed by the
/// file directory (`Key.fileDir`, big-endian: a count, then per file its size, key, 2 reserved
/// bytes and a 56-byte NUL-padded name). The signature, the ID and the directory are added by
/// `FWCfg` itself.
public struct FWCfgItems: Sendable {
    /// Item keys (QEMU's `FW_CFG_*`). Bit 14 (`writeChannel`) of a selector is ignored; bit 15
    /// (`archLocal`) selects the architecture's items.
    public enum Key {
        public static let signature: UInt16 = 0x00
        public static let id: UInt16 = 0x01
        public static let uuid: UInt16 = 0x02
        public static let ramSize: UInt16 = 0x03
        public static let noGraphic: UInt16 = 0x04
        public static let nbCPUs: UInt16 = 0x05
        public static let machineID: UInt16 = 0x06
        public static let kernelAddr: UInt16 = 0x07
        public static let kernelSize: UInt16 = 0x08
        public static let kernelCmdline: UInt16 = 0x09
        public static let initrdAddr: UInt16 = 0x0a
        public static let initrdSize: UInt16 = 0x0b
        public static let bootDevice: UInt16 = 0x0c
        public static let numa: UInt16 = 0x0d
        public static let bootMenu: UInt16 = 0x0e
        public static let maxCPUs: UInt16 = 0x0f
        public static let kernelEntry: UInt16 = 0x10
        public static let kernelData: UInt16 = 0x11
        public static let initrdData: UInt16 = 0x12
        public static let cmdlineAddr: UInt16 = 0x13
        public static let cmdlineSize: UInt16 = 0x14
        public static let cmdlineData: UInt16 = 0x15
        public static let setupAddr: UInt16 = 0x16
        public static let setupSize: UInt16 = 0x17
        public static let setupData: UInt16 = 0x18
        public static let fileDir: UInt16 = 0x19
        /// The first file's key.
        public static let fileFirst: UInt16 = 0x20
        /// Selector bit 14: "write" selectors (ignored: items are read-only through the data port).
        public static let writeChannel: UInt16 = 0x4000
        /// Selector bit 15: architecture-local items.
        public static let archLocal: UInt16 = 0x8000
        /// x86: whether ISA IRQ 0 is wired to I/O APIC pin 2 (firmware's MP table follows it).
        public static let irq0Override: UInt16 = archLocal | 0x02
        /// Keys are at most 14 bits plus `archLocal`.
        public static let entryMask: UInt16 = 0x3fff
    }

    /// Longest file name (the directory's name field is 56 bytes with a terminating NUL).
    public static let maxFileName = 55
    /// Most files (keys 0x20…0x3fff).
    public static let maxFiles = Int(Key.entryMask) + 1 - Int(Key.fileFirst)
    /// Size of one directory entry.
    public static let fileEntrySize = 64

    private(set) var numbered: [UInt16: [UInt8]] = [:]
    private(set) var files: [String: [UInt8]] = [:]

    public init() {}

    /// Sets numbered item `key` (not a file key) to `bytes`.
    public mutating func set(_ key: UInt16, bytes: [UInt8]) {
        precondition(key & Key.entryMask < Key.fileFirst, "fw_cfg key 0x\(String(key, radix: 16)) is in the file range")
        numbered[key & ~Key.writeChannel] = bytes
    }

    /// Sets numbered item `key` to `value`, little-endian.
    public mutating func set<T: FixedWidthInteger>(_ key: UInt16, le value: T) {
        set(key, bytes: withUnsafeBytes(of: value.littleEndian) { Array($0) })
    }

    /// Adds (or replaces) the file `name`. Names are 1–55 bytes of UTF-8 without NUL.
    public mutating func addFile(_ name: String, bytes: [UInt8]) throws(FWCfgError) {
        let utf8 = Array(name.utf8)
        guard !utf8.isEmpty, utf8.count <= Self.maxFileName, !utf8.contains(0) else {
            throw FWCfgError("fw_cfg file name \"\(name)\" must be 1 to \(Self.maxFileName) bytes without NUL")
        }
        guard files[name] != nil || files.count < Self.maxFiles else {
            throw FWCfgError("fw_cfg: more than \(Self.maxFiles) files")
        }
        guard UInt64(bytes.count) <= UInt64(UInt32.max) else {
            throw FWCfgError("fw_cfg file \(name): \(bytes.count) bytes, at most 4 GiB - 1")
        }
        files[name] = bytes
    }

    /// The file `name`'s bytes, if added.
    public func file(_ name: String) -> [UInt8]? { files[name] }

    /// The file names in key order (sorted by their bytes, as QEMU sorts them).
    public var fileNames: [String] { files.keys.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) } }
}

/// A fw_cfg item set or file that cannot be built.
public struct FWCfgError: Error, CustomStringConvertible, Equatable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// QEMU's firmware configuration device (fw_cfg) on x86 port I/O, with the DMA interface.
///
/// Insert it at `FWCfg.defaultBase` (0x510) with `portCount` (12) ports:
///
/// | port | offset | access |
/// |---|---|---|
/// | 0x510 | 0 | 16-bit write: select an item (data offset back to 0) |
/// | 0x511 (and 0x510 read) | 1 | 8-bit read: the next byte of the item, 0 past its end; writes ignored |
/// | 0x514 | 4 | 32-bit write: bits 63–32 of the DMA access address (big-endian) |
/// | 0x518 | 8 | 32-bit write: bits 31–0, then the access is performed |
/// | 0x514–0x51b | 4–11 | reads: the DMA signature "QEMU CFG" |
///
/// A DMA access is a 16-byte `FWCfgDmaAccess` in guest memory (big-endian control, length,
/// address). Control bit 3 (select) selects the item in bits 31–16 first; then bit 1 (read)
/// copies `length` bytes of the item from the data offset to the address (zeros past the
/// item's end), or bit 2 (skip) only advances the offset; bit 4 (write) sets the error bit,
/// since no item is writable. When done the device writes the control word back: 0, or bit 0
/// (error) when a guest range was not RAM or the write was refused. Every guest address and
/// length goes through `GuestMemory`'s checks; an access structure that is not in RAM is dropped.
public final class FWCfg: BusDevice, Sendable {
    /// The selector port.
    public static let defaultBase: UInt64 = 0x510
    /// Ports from the selector through the DMA address's low half.
    public static let portCount: UInt64 = 12
    /// The DMA signature read from the DMA address port ("QEMU CFG").
    public static let dmaSignature: UInt64 = 0x5145_4d55_2043_4647
    /// FW_CFG_ID bits: the traditional interface and DMA.
    public static let idTraditional: UInt32 = 1 << 0
    public static let idDMA: UInt32 = 1 << 1
    /// DMA control bits.
    public enum Control {
        public static let error: UInt32 = 1 << 0
        public static let read: UInt32 = 1 << 1
        public static let skip: UInt32 = 1 << 2
        public static let select: UInt32 = 1 << 3
        public static let write: UInt32 = 1 << 4
    }
    /// Size of the `FWCfgDmaAccess` structure.
    public static let dmaAccessSize = 16

    /// The selector, data offset and half-written DMA address (also the saved state).
    public struct State: Codable, Sendable, Equatable {
        /// The selected key (write-channel bit cleared), or nil when none is selected.
        var selector: UInt16? = nil
        /// The data offset in the selected item.
        var offset: UInt32 = 0
        /// The DMA address's high half, written at 0x514 and waiting for the low half.
        var dmaAddressHigh: UInt32 = 0
    }

    private let items: [UInt16: [UInt8]]
    private let directory: [(name: String, key: UInt16, size: Int)]
    private let memory: GuestMemory?
    private let state = Mutex(State())
    private let dmaCount = Atomic<UInt64>(0)
    private let dmaByteCount = Atomic<UInt64>(0)
    private let dmaNanoCount = Atomic<UInt64>(0)

    /// Creates the device serving `items` plus the signature ("QEMU"), the ID (traditional and
    /// DMA interfaces) and the file directory. DMA accesses go to `memory` (nil: every DMA access
    /// fails, for tests of the port interface).
    public init(items: FWCfgItems, memory: GuestMemory?) {
        self.memory = memory
        var all = items.numbered
        all[FWCfgItems.Key.signature] = Array("QEMU".utf8)
        let id = Self.idTraditional | Self.idDMA
        all[FWCfgItems.Key.id] = withUnsafeBytes(of: id.littleEndian) { Array($0) }
        var dir: [(String, UInt16, Int)] = []
        var listing = withUnsafeBytes(of: UInt32(items.files.count).bigEndian) { Array($0) }
        for (i, name) in items.fileNames.enumerated() {
            let key = FWCfgItems.Key.fileFirst + UInt16(i)
            let bytes = items.files[name] ?? []
            all[key] = bytes
            dir.append((name, key, bytes.count))
            listing += withUnsafeBytes(of: UInt32(bytes.count).bigEndian) { Array($0) }
            listing += withUnsafeBytes(of: key.bigEndian) { Array($0) }
            listing += [0, 0]
            var field = Array(name.utf8)
            field += [UInt8](repeating: 0, count: 56 - field.count)
            listing += field
        }
        all[FWCfgItems.Key.fileDir] = listing
        self.items = all
        self.directory = dir
    }

    /// The key of file `name`, if it exists.
    public func key(ofFile name: String) -> UInt16? { directory.first { $0.name == name }?.key }

    /// DMA accesses performed (for statistics and tests).
    public var dmaAccesses: UInt64 { dmaCount.load(ordering: .relaxed) }
    /// Bytes DMA reads copied into guest memory, and the time spent on the accesses (ns).
    public var dmaBytes: UInt64 { dmaByteCount.load(ordering: .relaxed) }
    public var dmaNanoseconds: UInt64 { dmaNanoCount.load(ordering: .relaxed) }

    /// The item a selector names: the write-channel bit is ignored.
    private func item(_ selector: UInt16?) -> [UInt8]? {
        guard let selector else { return nil }
        return items[selector]
    }

    private static func normalize(_ key: UInt16) -> UInt16 { key & ~FWCfgItems.Key.writeChannel }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            for i in data.indices {
                let (o, overflow) = offset.addingReportingOverflow(UInt64(i))
                if overflow { data[i] = 0; continue }
                switch o {
                case 0, 1:
                    data[i] = nextByte(&s)
                case 4..<12:
                    data[i] = UInt8(truncatingIfNeeded: Self.dmaSignature >> (8 * (11 - o)))
                default:
                    data[i] = 0
                }
            }
        }
    }

    /// The next data byte of the selected item (0 past its end or with no item); advances the offset.
    private func nextByte(_ s: inout State) -> UInt8 {
        guard let bytes = item(s.selector) else { return 0 }
        let o = Int(s.offset)
        guard o < bytes.count else { return 0 }
        s.offset += 1
        return bytes[o]
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        // Big-endian value of the written bytes (the DMA address registers are big-endian).
        let be = data.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        switch (offset, data.count) {
        case (0, 2):
            let key = UInt16(data[0]) | UInt16(data[1]) << 8       // the selector is little-endian
            state.withLock { s in
                s.selector = Self.normalize(key)
                s.offset = 0
            }
        case (4, 4):
            state.withLock { $0.dmaAddressHigh = UInt32(truncatingIfNeeded: be) }
        case (8, 4):
            let address = state.withLock { s -> UInt64 in
                let a = UInt64(s.dmaAddressHigh) << 32 | be
                s.dmaAddressHigh = 0
                return a
            }
            dma(at: address)
        case (4, 8):
            state.withLock { $0.dmaAddressHigh = 0 }
            dma(at: be)
        default:
            break   // data-port writes (read-only items) and other widths are ignored
        }
    }

    // MARK: DMA

    /// Performs the `FWCfgDmaAccess` at guest address `address`.
    func dma(at address: UInt64) {
        guard let memory, let header = try? memory.read(at: address, count: Self.dmaAccessSize) else { return }
        dmaCount.add(1, ordering: .relaxed)
        let start = Self.monotonicNanos()
        defer { dmaNanoCount.add(Self.monotonicNanos() &- start, ordering: .relaxed) }
        func be<T: FixedWidthInteger>(_: T.Type, _ at: Int) -> T {
            header[at..<at + MemoryLayout<T>.size].reduce(T(0)) { $0 << 8 | T($1) }
        }
        var control = be(UInt32.self, 0)
        let length = be(UInt32.self, 4)
        let target = be(UInt64.self, 8)
        state.withLock { s in
            if control & Control.select != 0 {
                s.selector = Self.normalize(UInt16(truncatingIfNeeded: control >> 16))
                s.offset = 0
            }
            let bytes = item(s.selector) ?? []
            if control & Control.read != 0 {
                if copy(bytes, from: s.offset, count: length, to: target, memory: memory) {
                    dmaByteCount.add(UInt64(length), ordering: .relaxed)
                } else {
                    control |= Control.error
                }
                s.offset = s.offset.addingReportingOverflow(length).overflow ? UInt32.max : s.offset + length
            } else if control & Control.write != 0 {
                control |= Control.error             // no item is writable
            } else if control & Control.skip != 0 {
                s.offset = s.offset.addingReportingOverflow(length).overflow ? UInt32.max : s.offset + length
            }
        }
        let status = control & Control.error
        try? memory.write(withUnsafeBytes(of: status.bigEndian) { Array($0) }, at: address)
        memory.dirtyLog.mark(address, count: 4)
    }

    private static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// Copies `count` bytes of `bytes` from `offset` (zeros past the end) to guest `target`,
    /// page by page so a range across RAM regions works; false when part of it is not RAM.
    private func copy(_ bytes: [UInt8], from offset: UInt32, count: UInt32, to target: UInt64, memory: GuestMemory) -> Bool {
        guard count > 0 else { return true }
        guard !target.addingReportingOverflow(UInt64(count) - 1).overflow else { return false }
        var done: UInt64 = 0
        while done < UInt64(count) {
            let gpa = target + done
            let chunk = min(UInt64(count) - done, 4096 - (gpa & 4095))
            let src = UInt64(offset) + done
            do {
                try memory.withBytes(at: gpa, count: Int(chunk)) { dst in
                    // The item's bytes in [src, src + chunk), then zeros.
                    let have = src < UInt64(bytes.count) ? Int(min(chunk, UInt64(bytes.count) - src)) : 0
                    if have > 0 {
                        bytes.withUnsafeBytes { dst.baseAddress!.copyMemory(from: $0.baseAddress! + Int(src), byteCount: have) }
                    }
                    if have < Int(chunk) { (dst.baseAddress! + have).initializeMemory(as: UInt8.self, repeating: 0, count: Int(chunk) - have) }
                }
                memory.dirtyLog.mark(gpa, count: chunk)   // a DMA write KVM's dirty log does not see
            } catch {
                return false
            }
            done += chunk
        }
        return true
    }
}

extension FWCfg: StatefulDevice {
    public static let stateVersion: UInt32 = 1

    public func saveState() -> State { state.withLock { $0 } }

    public func restoreState(_ saved: State) throws(DeviceStateError) {
        if let sel = saved.selector, sel & FWCfgItems.Key.writeChannel != 0 {
            throw DeviceStateError("fw_cfg: selector 0x\(String(sel, radix: 16)) has the write-channel bit set")
        }
        state.withLock { $0 = saved }
    }
}
