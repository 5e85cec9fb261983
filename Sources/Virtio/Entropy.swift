import GuestMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

@_silgen_name("getrandom")
private func c_getrandom(_ buf: UnsafeMutableRawPointer, _ len: Int, _ flags: UInt32) -> Int

/// virtio-rng (virtio 1.x, section 5.4): fills device-writable buffers with bytes from the host's
/// `getrandom(2)`. One request is served with at most `maxBytesPerRequest` bytes.
public final class VirtioEntropy: VirtioDevice {
    /// Queue size offered.
    public static let queueSize: UInt16 = 256
    /// Largest amount of entropy returned for one request.
    public static let maxBytesPerRequest = 64 << 10

    let log: VirtioLog
    private let active = Mutex<VirtioActivation?>(nil)

    /// An entropy device; guest-caused errors go to `log`.
    public init(log: VirtioLog = .discard) { self.log = log }

    public var deviceType: VirtioDeviceType { .entropy }
    public var deviceFeatures: UInt64 { 0 }
    public var queueMaxSizes: [UInt16] { [Self.queueSize] }
    public var configSize: Int { 0 }
    public func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer) { copyConfig([], offset: offset, into: data) }
    public func writeConfig(offset: Int, data: UnsafeRawBufferPointer) {}

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        active.withLock { $0 = activation }
    }

    public func reset() { active.withLock { $0 = nil } }

    public func processQueue(_ index: Int) throws(VirtioError) {
        let result: Result<Void, VirtioError> = active.withLock { a in
            guard let a, index == 0, let q = a.queues.first ?? nil else { return .success(()) }
            do throws(VirtioError) {
                try q.serve(log: log, interrupt: a.interrupt) { chain in
                    let n = Int(min(chain.writableLength, UInt64(Self.maxBytesPerRequest)))
                    var w = ChainWriter(memory: a.memory, chain: chain)
                    do {
                        try w.forEachSegment(n) { Self.fillRandom($0) }
                    } catch {
                        log.error("virtio-rng: \(error)")
                    }
                    return UInt32(w.written)
                }
                return .success(())
            } catch { return .failure(error) }
        }
        try result.get()
    }

    /// Fills `buffer` from getrandom(2) (blocking only until the host pool is initialized).
    static func fillRandom(_ buffer: UnsafeMutableRawBufferPointer) {
        var done = 0
        while done < buffer.count {
            let n = c_getrandom(buffer.baseAddress! + done, buffer.count - done, 0)
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            break
        }
    }
}
