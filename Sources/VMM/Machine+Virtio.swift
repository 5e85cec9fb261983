import Devices
import DiskImage
import GuestMemory
import KVM
import Logging
import PCI
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// One `--disk path=F[,format=raw|qcow2][,readonly=on][,id=ID][,backing_files=on][,cache=none|writeback]`.
public struct DiskSpec: Codable, Sendable, Equatable {
    /// Image file.
    public var path: String
    /// "raw" or "qcow2"; nil probes the file.
    public var format: String?
    /// Open the image read-only (the guest sees VIRTIO_BLK_F_RO; writes fail with IOERR).
    public var readOnly: Bool
    /// Serial returned by GET_ID (at most 20 bytes); nil gives "swiftkvm-diskN".
    public var id: String?
    /// Allow opening the backing files named inside a qcow2 image (off by default: an image could
    /// name any host file).
    public var backingFiles: Bool
    /// Host caching: "writeback" (page cache, the default) or "none" (O_DIRECT, raw images only).
    public var cache: String

    public init(path: String, format: String? = nil, readOnly: Bool = false, id: String? = nil, backingFiles: Bool = false,
                cache: String = "writeback") {
        self.path = path; self.format = format; self.readOnly = readOnly; self.id = id; self.backingFiles = backingFiles
        self.cache = cache
    }

    /// Keys accepted by `init(parsing:)`.
    public static let keys = ["path", "format", "readonly", "id", "backing_files", "cache"]

    /// Parses `path=F[,format=raw|qcow2][,readonly=on|off][,id=ID][,backing_files=on|off][,cache=none|writeback]`.
    public init(parsing text: String) throws {
        func bad(_ why: String) -> VMMError { .invalidValue(what: "--disk", value: text, reason: why) }
        func flag(_ key: String, _ v: String) throws -> Bool {
            switch v.lowercased() {
            case "on", "true", "yes", "1": return true
            case "off", "false", "no", "0": return false
            default: throw bad("\(key)=\(v): expected on or off")
            }
        }
        var path: String?
        var spec = DiskSpec(path: "")
        var seen = Set<String>()
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard let eq = item.firstIndex(of: "=") else {
                throw bad("'\(item)' is not key=value (keys: \(Self.keys.joined(separator: ", ")))")
            }
            let key = String(item[..<eq]), value = String(item[item.index(after: eq)...])
            guard seen.insert(key).inserted else { throw bad("key '\(key)' given twice") }
            switch key {
            case "path":
                guard !value.isEmpty else { throw bad("path is empty") }
                path = value
            case "format":
                guard ImageFormat(rawValue: value) != nil else { throw bad("format=\(value): expected raw or qcow2") }
                spec.format = value
            case "readonly": spec.readOnly = try flag(key, value)
            case "backing_files": spec.backingFiles = try flag(key, value)
            case "cache":
                guard value == "none" || value == "writeback" else { throw bad("cache=\(value): expected none or writeback") }
                spec.cache = value
            case "id":
                guard !value.isEmpty, value.utf8.count <= VirtioBlock.idLength else {
                    throw bad("id=\(value): expected 1 to \(VirtioBlock.idLength) bytes")
                }
                spec.id = value
            default:
                throw bad("unknown key '\(key)' (keys: \(Self.keys.joined(separator: ", ")))")
            }
        }
        guard let path else { throw bad("path=FILE is required") }
        if spec.cache == "none", spec.format == "qcow2" { throw bad("cache=none needs a raw image") }
        spec.path = path
        self = spec
    }
}

/// KVM_IOEVENTFD for the virtio transports' queue notify addresses.
struct KVMIOEventRegistry: IOEventRegistry {
    let vm: VirtualMachine
    func register(address: UInt64, length: Int, datamatch: UInt64?, eventFD: EventFD, pio: Bool) throws {
        try vm.registerIOEventFD(fd: eventFD.fd, address: address, length: UInt32(length), datamatch: datamatch, pio: pio)
    }
    func unregister(address: UInt64, length: Int, datamatch: UInt64?, eventFD: EventFD, pio: Bool) throws {
        try vm.unregisterIOEventFD(fd: eventFD.fd, address: address, length: UInt32(length), datamatch: datamatch, pio: pio)
    }
}

/// An advisory lock on a disk image held while the VM runs (exclusive when writable, shared when
/// read-only), so two VMs cannot write one image.
final class DiskLock: Sendable {
    let fd: Int32
    init(path: String, exclusive: Bool) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw VMMError.invalidValue(what: "--disk", value: path, reason: "cannot open: \(String(cString: strerror(errno)))")
        }
        if flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0 {
            let e = errno
            close(fd)
            throw VMMError.invalidValue(what: "--disk", value: path,
                                        reason: e == EWOULDBLOCK ? "the image is locked: in use by another VM, or given twice"
                                                                 : "cannot lock: \(String(cString: strerror(e)))")
        }
        self.fd = fd
    }
    deinit { close(fd) }
}

/// The machine's virtio devices: their PCI transports, event loops, disk backends and locks.
final class MachineVirtio: Sendable {
    private struct State {
        var loops: [EventLoop] = []
        var transports: [VirtioPCITransport] = []
        var backends: [any BlockBackend] = []
        var locks: [DiskLock] = []
        var console: VirtioConsole?
        var started = false
    }
    private let state = Mutex(State())

    /// The virtio console, when configured.
    var console: VirtioConsole? { state.withLock { $0.console } }

    func add(loop: EventLoop? = nil, transport: VirtioPCITransport? = nil, backend: (any BlockBackend)? = nil,
             lock: DiskLock? = nil, console: VirtioConsole? = nil) {
        state.withLock { s in
            if let loop { s.loops.append(loop) }
            if let transport { s.transports.append(transport) }
            if let backend { s.backends.append(backend) }
            if let lock { s.locks.append(lock) }
            if let console { s.console = console }
        }
    }

    /// Starts the device threads (before the vCPUs).
    func start() throws(HostThread.StartError) {
        let loops = state.withLock { s -> [EventLoop] in
            s.started = true
            return s.loops
        }
        for l in loops { try l.start() }
    }

    /// Stops the device threads, then flushes and closes the disks and releases their locks (after
    /// the vCPUs stopped; a restarted guest gets a new `Machine` that opens them again).
    func stop(logger: Logger) {
        let (loops, transports, backends) = state.withLock { s in
            defer { s.backends = []; s.locks = [] }
            return (s.loops, s.transports, s.backends)
        }
        for l in loops { l.stop() }
        for t in transports { t.shutdown() }
        for b in backends {
            do { try b.close() } catch { logger.error("virtio-blk: flush at exit failed: \(error)") }
        }
    }
}

extension Machine {
    /// Builds the configured virtio devices and attaches them to PCI in slot order: disks (in
    /// `--disk` order), then the console, then the entropy device. Each disk gets its own
    /// event-loop thread (its I/O is synchronous); the console and rng share one.
    func setUpVirtio() throws {
        let log = VirtioLog { [logger] message in logger.warning("\(message)") }
        let ioEvents = KVMIOEventRegistry(vm: vm)
        for (i, disk) in config.disks.enumerated() {
            let lock = try DiskLock(path: disk.path, exclusive: !disk.readOnly)
            let backend: any BlockBackend
            do {
                let format = try disk.format.flatMap(ImageFormat.init(rawValue:)) ?? probeImageFormat(path: disk.path)
                if disk.cache == "none", format != .raw {
                    throw VMMError.invalidValue(what: "--disk", value: disk.path, reason: "cache=none needs a raw image, this is \(format.rawValue)")
                }
                if format == .raw {
                    // Raw images: no backend-wide lock and one preadv/pwritev per request.
                    backend = try RawFileBackend(path: disk.path, readOnly: disk.readOnly, direct: disk.cache == "none")
                } else {
                    let options = ImageOpenOptions(readOnly: disk.readOnly, allowBackingFiles: disk.backingFiles, format: disk.format)
                    backend = try openDiskImage(path: disk.path, options: options)
                }
            } catch let e as VMMError {
                throw e
            } catch {
                var reason = "\(error)"
                if !disk.backingFiles, reason.lowercased().contains("backing") {
                    reason += " (add backing_files=on to allow opening the backing file named inside the image)"
                }
                throw VMMError.invalidValue(what: "--disk", value: disk.path, reason: reason)
            }
            let loop = try EventLoop(name: "virtio-blk\(i)")
            // Raw files have no lock in the backend: run requests in parallel (qcow2 serializes). With
            // O_DIRECT every request waits for the device, so allow as many as a typical queue depth.
            let threads = backend is RawFileBackend ? (disk.cache == "none" ? 8 : 4) : 0
            let device = VirtioBlock(backend: backend, serial: disk.id ?? "swiftkvm-disk\(i)", ioThreads: threads, log: log)
            let transport = try VirtioPCITransport(device: device, memory: memory, msiController: msiController,
                                                   eventLoop: loop, ioEvents: ioEvents, log: log)
            virtio.add(loop: loop, transport: transport, backend: backend, lock: lock)
            let slot = try attachPCIDevice(transport).slot
            logger.info("virtio-blk \(disk.path) (\(backend.size) bytes\(disk.readOnly ? ", read-only" : "")) at PCI slot \(slot)")
        }
        guard config.virtioConsole || config.rng else { return }
        let loop = try EventLoop(name: "virtio")
        virtio.add(loop: loop)
        if config.virtioConsole {
            let console = VirtioConsole(output: serialOutput, log: log)
            let transport = try VirtioPCITransport(device: console, memory: memory, msiController: msiController,
                                                   eventLoop: loop, ioEvents: ioEvents, log: log)
            virtio.add(transport: transport, console: console)
            _ = try attachPCIDevice(transport)
        }
        if config.rng {
            let transport = try VirtioPCITransport(device: VirtioEntropy(log: log), memory: memory, msiController: msiController,
                                                   eventLoop: loop, ioEvents: ioEvents, log: log)
            virtio.add(transport: transport)
            _ = try attachPCIDevice(transport)
        }
    }

    /// Host console input: to the UART and, when there is one, to the virtio console (hvc0), so
    /// that whichever the guest uses as its console reads it.
    public func enqueueConsoleInput(_ bytes: [UInt8]) {
        serial.enqueue(bytes)
        virtio.console?.enqueueInput(bytes)
    }
}
