import Devices
import Synchronization

/// An MSI-X table and pending-bit array (PBA) with the Message Control state.
///
/// The owning device serves the table and PBA ranges of its BAR by forwarding accesses to
/// `tableRead`/`tableWrite`/`pbaRead`/`pbaWrite`; `PCIConfiguration.addMSIX` forwards
/// Message Control writes (enable, function mask) to `setControl`. Entries start masked with
/// address and data 0. A vector signalled while masked (per-vector mask or function mask)
/// sets its pending bit and fires when unmasked. `MSIVector.program` is called only when an
/// unmasked vector's address/data differ from what was last programmed, always before
/// `fire()`. The vector calls happen under the table's lock, so they are ordered; a vector
/// must not call back into the table.
public final class MSIXTable: Sendable {
    /// Bytes per table entry.
    public static let entrySize = 16
    /// Largest number of vectors MSI-X allows.
    public static let maxVectors = 2048

    struct Entry {
        var addressLow: UInt32 = 0
        var addressHigh: UInt32 = 0
        var data: UInt32 = 0
        var control: UInt32 = 1 // masked

        var address: UInt64 { UInt64(addressHigh) << 32 | UInt64(addressLow) }
        var masked: Bool { control & 1 != 0 }

        func word(_ i: Int) -> UInt32 {
            switch i { case 0: addressLow; case 1: addressHigh; case 2: data; default: control }
        }
        mutating func setWord(_ i: Int, _ v: UInt32) {
            switch i {
            case 0: addressLow = v & ~0x3 // message address is dword aligned
            case 1: addressHigh = v
            case 2: data = v
            default: control = v & 1 // only the mask bit is defined
            }
        }
    }

    struct State {
        var entries: [Entry]
        var pending: [Bool]
        var programmed: [(address: UInt64, data: UInt32)?]
        var enabled = false
        var functionMasked = false
    }

    /// Number of vectors (table entries).
    public let vectorCount: Int
    private let vectors: [any MSIVector]
    private let state: Mutex<State>

    /// Creates a table of `vectorCount` entries (1–2048), each with a vector from `controller`.
    public init(vectorCount: Int, controller: any MSIController) throws {
        guard vectorCount >= 1, vectorCount <= Self.maxVectors else { throw PCIError.invalidVectorCount(vectorCount) }
        var vs: [any MSIVector] = []
        for i in 0..<vectorCount {
            do { vs.append(try controller.makeVector()) } catch {
                throw PCIError.vectorUnavailable(index: i, reason: "\(error)")
            }
        }
        self.vectorCount = vectorCount
        self.vectors = vs
        self.state = Mutex(State(entries: Array(repeating: Entry(), count: vectorCount),
                                 pending: Array(repeating: false, count: vectorCount),
                                 programmed: Array(repeating: nil, count: vectorCount)))
    }

    /// Size of the table in bytes (16 per vector).
    public var tableSize: UInt64 { UInt64(vectorCount * Self.entrySize) }
    /// Size of the PBA in bytes (a multiple of 8).
    public var pbaSize: UInt64 { UInt64((vectorCount + 63) / 64 * 8) }

    /// Whether the guest set MSI-X Enable.
    public var isEnabled: Bool { state.withLock { $0.enabled } }
    /// Whether the guest set the function mask.
    public var isFunctionMasked: Bool { state.withLock { $0.functionMasked } }

    /// Whether vector `v`'s pending bit is set (false for out-of-range `v`).
    public func isPending(_ v: Int) -> Bool {
        state.withLock { s in v >= 0 && v < vectorCount ? s.pending[v] : false }
    }

    /// Whether vector `v` is masked by its own mask bit (true for out-of-range `v`).
    public func isMasked(_ v: Int) -> Bool {
        state.withLock { s in v >= 0 && v < vectorCount ? s.entries[v].masked : true }
    }

    /// Signals vector `v`: fires it, or sets its pending bit when masked (delivered on unmask).
    /// Does nothing when MSI-X is disabled (the device then uses INTx) or `v` is out of range
    /// (e.g. VIRTIO_MSI_NO_VECTOR 0xffff). Returns whether the message was sent now.
    @discardableResult
    public func signal(_ v: Int) -> Bool {
        guard v >= 0, v < vectorCount else { return false }
        return state.withLock { s in
            guard s.enabled else { return false }
            if s.functionMasked || s.entries[v].masked {
                s.pending[v] = true
                return false
            }
            deliver(&s, v)
            return true
        }
    }

    /// Applies Message Control: MSI-X Enable and Function Mask. Delivers pending vectors that
    /// became unmasked.
    public func setControl(enabled: Bool, functionMasked: Bool) {
        state.withLock { s in
            s.enabled = enabled
            s.functionMasked = functionMasked
            for v in 0..<vectorCount { evaluate(&s, v) }
        }
    }

    /// Resets to the power-on state (disabled, all entries masked and zero, nothing pending).
    public func reset() {
        state.withLock { s in
            s.entries = Array(repeating: Entry(), count: vectorCount)
            s.pending = Array(repeating: false, count: vectorCount)
            s.enabled = false
            s.functionMasked = false
        }
    }

    // MARK: Guest access (offsets relative to the table / PBA start)

    /// A guest read of the table. Bytes outside the table read 0xff.
    public func tableRead(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            for i in 0..<data.count {
                let (o, overflow) = offset.addingReportingOverflow(UInt64(i))
                guard !overflow, o < tableSize else { data[i] = 0xff; continue }
                let e = Int(o) / Self.entrySize, within = Int(o) % Self.entrySize
                data[i] = UInt8((s.entries[e].word(within / 4) >> (8 * UInt32(within % 4))) & 0xff)
            }
        }
    }

    /// A guest write to the table (any width). Bytes outside the table are ignored. Entries
    /// whose mask bit was cleared deliver their pending message; unmasked entries whose
    /// address/data changed are reprogrammed.
    public func tableWrite(offset: UInt64, data: UnsafeRawBufferPointer) {
        state.withLock { s in
            var touched: [Int] = []
            for i in 0..<data.count {
                let (o, overflow) = offset.addingReportingOverflow(UInt64(i))
                guard !overflow, o < tableSize else { continue }
                let e = Int(o) / Self.entrySize, within = Int(o) % Self.entrySize
                let word = within / 4, shift = 8 * UInt32(within % 4)
                var v = s.entries[e].word(word)
                v = (v & ~(0xff << shift)) | UInt32(data[i]) << shift
                s.entries[e].setWord(word, v)
                if touched.last != e { touched.append(e) }
            }
            for e in touched { evaluate(&s, e) }
        }
    }

    /// A guest read of the PBA (one bit per vector). Bytes outside it read 0xff.
    public func pbaRead(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            for i in 0..<data.count {
                let (o, overflow) = offset.addingReportingOverflow(UInt64(i))
                guard !overflow, o < pbaSize else { data[i] = 0xff; continue }
                var byte: UInt8 = 0
                for bit in 0..<8 {
                    let v = Int(o) * 8 + bit
                    if v < vectorCount && s.pending[v] { byte |= 1 << UInt8(bit) }
                }
                data[i] = byte
            }
        }
    }

    /// A guest write to the PBA: read-only, ignored.
    public func pbaWrite(offset: UInt64, data: UnsafeRawBufferPointer) {}

    // MARK: Delivery (under the lock)

    /// Brings vector `v` up to date: reprograms it if unmasked and changed, fires it if pending.
    private func evaluate(_ s: inout State, _ v: Int) {
        guard s.enabled, !s.functionMasked, !s.entries[v].masked else { return }
        syncProgram(&s, v)
        if s.pending[v] {
            s.pending[v] = false
            vectors[v].fire()
        }
    }

    private func deliver(_ s: inout State, _ v: Int) {
        syncProgram(&s, v)
        vectors[v].fire()
    }

    private func syncProgram(_ s: inout State, _ v: Int) {
        let e = s.entries[v]
        if let p = s.programmed[v], p.address == e.address, p.data == e.data { return }
        s.programmed[v] = (e.address, e.data)
        vectors[v].program(address: e.address, data: e.data)
    }
}

extension MSIXTable {
    /// The table as a snapshot saves it: each entry's four dwords, the pending bits and
    /// Message Control.
    public struct SavedState: Codable, Sendable, Equatable {
        public var entries: [[UInt32]]
        public var pending: [Bool]
        public var enabled: Bool
        public var functionMasked: Bool
    }

    /// The table's state.
    public func saveState() -> SavedState {
        state.withLock { s in
            SavedState(entries: s.entries.map { e in (0..<4).map { e.word($0) } }, pending: s.pending,
                       enabled: s.enabled, functionMasked: s.functionMasked)
        }
    }

    /// Puts a saved table back (same vector count) and programs the routes of the vectors that
    /// are live, firing the pending ones that are unmasked.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.entries.count == vectorCount, saved.pending.count == vectorCount,
              saved.entries.allSatisfy({ $0.count == 4 }) else {
            throw DeviceStateError("MSI-X: \(saved.entries.count) saved entries (\(saved.pending.count) pending bits), this table has \(vectorCount) of 4 dwords")
        }
        state.withLock { s in
            for (v, words) in saved.entries.enumerated() {
                var e = Entry()
                for (i, w) in words.enumerated() { e.setWord(i, w) }
                s.entries[v] = e
            }
            s.pending = saved.pending
            s.enabled = saved.enabled
            s.functionMasked = saved.functionMasked
            s.programmed = Array(repeating: nil, count: vectorCount)
            for v in 0..<vectorCount { evaluate(&s, v) }
        }
    }
}
