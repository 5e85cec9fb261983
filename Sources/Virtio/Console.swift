import Devices
import GuestMemory
import Synchronization

/// virtio-console (virtio 1.x, section 5.3) with a single port (no MULTIPORT): the guest's hvc0.
///
/// Queue 0 (receiveq) carries host input, queued with `enqueueInput`, into the driver's
/// device-writable buffers; queue 1 (transmitq) sends the guest's output to `output`.
/// VIRTIO_CONSOLE_F_SIZE reports `columns` × `rows`; EMERG_WRITE writes of the config's
/// `emerg_wr` field go to the output too.
public final class VirtioConsole: VirtioDevice {
    /// Feature bits.
    public enum Feature {
        public static let size: UInt64 = 1 << 0
        public static let emergencyWrite: UInt64 = 1 << 2
    }
    /// Queue size offered.
    public static let queueSize: UInt16 = 256
    /// Host input held while the guest has no receive buffers; older bytes are dropped beyond it.
    public static let inputLimit = 64 << 10

    let output: any SerialOutput
    let log: VirtioLog
    /// Console size reported with VIRTIO_CONSOLE_F_SIZE.
    public let columns: UInt16
    public let rows: UInt16
    private struct State {
        var active: VirtioActivation?
        var input: [UInt8] = []
        var inputStart = 0
    }
    private let state = Mutex(State())

    /// A console writing guest output to `output`.
    public init(output: any SerialOutput, columns: UInt16 = 80, rows: UInt16 = 25, log: VirtioLog = .discard) {
        self.output = output
        self.columns = columns
        self.rows = rows
        self.log = log
    }

    public var deviceType: VirtioDeviceType { .console }
    public var deviceFeatures: UInt64 { Feature.size | Feature.emergencyWrite }
    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize] }
    public var configSize: Int { 12 }

    public func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer) {
        var c = [UInt8](repeating: 0, count: 12)
        c.putLE(columns, at: 0)
        c.putLE(rows, at: 2)
        c.putLE(UInt32(1), at: 4) // max_nr_ports
        copyConfig(c, offset: offset, into: data)
    }

    public func writeConfig(offset: Int, data: UnsafeRawBufferPointer) {
        // emerg_wr (offset 8, 4 bytes): one character.
        if offset == 8, data.count >= 1 { output.write([data[0]]) }
    }

    /// Queues host bytes for the guest (from any thread); delivered when the driver has buffers.
    public func enqueueInput(_ bytes: [UInt8]) {
        let schedule = state.withLock { s -> (@Sendable (Int) -> Void)? in
            s.input.append(contentsOf: bytes)
            let pending = s.input.count - s.inputStart
            if pending > Self.inputLimit { s.inputStart += pending - Self.inputLimit }
            if s.inputStart > Self.inputLimit { s.input.removeFirst(s.inputStart); s.inputStart = 0 }
            return s.active?.schedule
        }
        schedule?(0)
    }

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        let hasInput = state.withLock { s in
            s.active = activation
            return s.input.count > s.inputStart
        }
        if hasInput { activation.schedule(0) }
    }

    public func reset() { state.withLock { $0.active = nil } }

    public func processQueue(_ index: Int) throws(VirtioError) {
        if index == 0 { try receive() } else if index == 1 { try transmit() }
    }

    private func receive() throws(VirtioError) {
        let r: Result<Void, VirtioError> = state.withLock { s in
            guard let a = s.active, let q = a.queues.first ?? nil else { return .success(()) }
            do throws(VirtioError) {
                var added = false
                while s.input.count > s.inputStart {
                    guard let item = try q.popAvailable() else {
                        if q.enableNotification() { continue }
                        break
                    }
                    switch item {
                    case .chain(let chain):
                        let n = Int(min(chain.writableLength, UInt64(s.input.count - s.inputStart)))
                        var w = ChainWriter(memory: a.memory, chain: chain)
                        do { try w.write(Array(s.input[s.inputStart..<(s.inputStart + n)])) } catch { log.error("virtio-console: \(error)") }
                        s.inputStart += Int(w.written)
                        q.addUsed(head: chain.head, length: UInt32(w.written))
                    case .malformed(let head, let error):
                        log.error("\(error)")
                        q.addUsed(head: head, length: 0)
                    }
                    added = true
                }
                if s.inputStart == s.input.count { s.input.removeAll(keepingCapacity: true); s.inputStart = 0 }
                if added && q.needsInterrupt() { a.interrupt.signalQueue(0) }
                return .success(())
            } catch { return .failure(error) }
        }
        try r.get()
    }

    private func transmit() throws(VirtioError) {
        guard let a = state.withLock({ $0.active }), a.queues.count > 1, let q = a.queues[1] else { return }
        try q.serve(log: log, interrupt: a.interrupt) { chain in
            var r = ChainReader(memory: a.memory, chain: chain)
            let n = Int(min(r.remaining, 1 << 20))
            do { output.write(try r.read(n)) } catch { log.error("virtio-console: \(error)") }
            return 0
        }
    }
}
