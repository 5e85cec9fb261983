/// A device model whose state a snapshot saves and a restore puts back (snapshots, migration).
///
/// `saveState` is called while the machine is paused; `restoreState` on a machine built from the
/// same configuration, before it runs. A restore checks what it is given (sizes, ranges) and
/// throws instead of building an impossible device: a snapshot file is input like any other.
public protocol StatefulDevice: AnyObject {
    associatedtype SavedState: Codable & Sendable
    /// Format version of `SavedState`; a restore refuses any other.
    static var stateVersion: UInt32 { get }
    /// The device's state.
    func saveState() -> SavedState
    /// Replaces the device's state with `state` (from `saveState` of the same version) and
    /// re-drives its interrupt lines to match.
    func restoreState(_ state: SavedState) throws(DeviceStateError)
}

/// A saved device state that cannot be restored: what is wrong, naming the field.
public struct DeviceStateError: Error, CustomStringConvertible, Equatable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension ByteQueue: Codable {
    /// The largest queue a saved state may ask for.
    static let maxSavedCapacity = 1 << 20

    private enum CodingKeys: String, CodingKey { case capacity, bytes }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let capacity = try c.decode(Int.self, forKey: .capacity)
        let bytes = try c.decode([UInt8].self, forKey: .bytes)
        guard (1...Self.maxSavedCapacity).contains(capacity) else {
            throw DecodingError.dataCorruptedError(forKey: .capacity, in: c, debugDescription: "queue capacity \(capacity) out of range")
        }
        guard bytes.count <= capacity else {
            throw DecodingError.dataCorruptedError(forKey: .bytes, in: c, debugDescription: "\(bytes.count) bytes in a queue of \(capacity)")
        }
        self.init(capacity: capacity)
        for b in bytes { push(b) }
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(capacity, forKey: .capacity)
        try c.encode(contents, forKey: .bytes)
    }
}
