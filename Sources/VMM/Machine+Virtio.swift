import Devices
import DiskImage
import GuestMemory
import KVM
import Logging
import Net
import PCI
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// One `--disk path=F[,format=raw|qcow2][,readonly=on][,id=ID][,backing_files=on][,cache=none|writeback][,if=…][,media=…][,bootindex=N]`.
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
    /// Rate limit of the guest's requests (bandwidth in bytes, ops); nil: none.
    public var rateLimit: RateLimitConfig?
    /// The bus: nil or "virtio" (a virtio-blk device of its own) or "scsi" (a unit of the virtio-scsi adapter).
    public var interface: String?
    /// nil or "disk", or "cdrom": a CD/DVD-ROM drive (virtio-scsi; read-only, removable, 2048-byte blocks).
    public var media: String?
    /// Firmware boot priority (QEMU's `bootindex`: lower boots first); nil: by `--boot`.
    public var bootIndex: Int?

    /// Whether the disk is a unit of the virtio-scsi adapter.
    public var isSCSI: Bool { interface == "scsi" }
    /// Whether the disk is a CD/DVD-ROM drive.
    public var isCDROM: Bool { media == "cdrom" }

    public init(path: String, format: String? = nil, readOnly: Bool = false, id: String? = nil, backingFiles: Bool = false,
                cache: String = "writeback", rateLimit: RateLimitConfig? = nil) {
        self.path = path; self.format = format; self.readOnly = readOnly; self.id = id; self.backingFiles = backingFiles
        self.cache = cache; self.rateLimit = rateLimit
    }

    /// Keys accepted by `init(parsing:)`.
    public static let keys = ["path", "format", "readonly", "id", "backing_files", "cache", "if", "media", "bootindex"]

    /// Parses `path=F[,format=raw|qcow2][,readonly=on|off][,id=ID][,backing_files=on|off][,cache=none|writeback]`
    /// `[,if=virtio|scsi][,media=disk|cdrom][,bootindex=N]` (`media=cdrom` implies `if=scsi` and read-only).
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
        var readOnlyGiven: Bool?
        var spec = DiskSpec(path: "")
        for (key, value) in try OptionItems.pairs(text.split(separator: ",", omittingEmptySubsequences: false),
                                                  keys: Self.keys, bad: bad) {
            switch key {
            case "path":
                guard !value.isEmpty else { throw bad("path is empty") }
                path = value
            case "format":
                guard ImageFormat(rawValue: value) != nil else { throw bad("format=\(value): expected raw or qcow2") }
                spec.format = value
            case "readonly":
                spec.readOnly = try flag(key, value)
                readOnlyGiven = spec.readOnly
            case "backing_files": spec.backingFiles = try flag(key, value)
            case "cache":
                guard value == "none" || value == "writeback" else { throw bad("cache=\(value): expected none or writeback") }
                spec.cache = value
            case "if":
                guard value == "virtio" || value == "scsi" else { throw bad("if=\(value): expected virtio or scsi") }
                spec.interface = value
            case "media":
                guard value == "disk" || value == "cdrom" else { throw bad("media=\(value): expected disk or cdrom") }
                spec.media = value
            case "bootindex":
                guard let n = BootDevice.parseIndex(value) else { throw bad("bootindex=\(value): expected 0 to 9999") }
                spec.bootIndex = n
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
        if spec.isCDROM {
            if spec.interface == "virtio" { throw bad("media=cdrom needs if=scsi (a virtio-blk disk has no removable medium; use readonly=on)") }
            if readOnlyGiven == false { throw bad("a CD-ROM is read-only (readonly=off)") }
            spec.interface = "scsi"
            spec.readOnly = true
        }
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

/// The image locks of a disk held while the VM runs: the image and (with `backing_files=on`) its backing chain,
/// locked as QEMU locks a virtio-blk drive of a running guest (`ImageLockRequest.guestDisk`), so that neither
/// another VM nor qemu-img, qemu-io or QEMU can write what the guest uses. Released when the disk is closed.
final class DiskLock: Sendable {
    let locks: [ImageLock]
    init(_ disk: DiskSpec) throws {
        do {
            locks = try lockImageChain(path: disk.path, format: disk.format.flatMap(ImageFormat.init(rawValue:)),
                                       request: .guestDisk(readOnly: disk.readOnly), followBacking: disk.backingFiles)
        } catch {
            throw VMMError.invalidValue(what: "--disk", value: disk.path, reason: "\(error)")
        }
    }
    deinit { locks.releaseAll() }

    /// Releases the locks now (idempotent), for a migration target that takes them over.
    func release() { locks.releaseAll() }

    /// Whether `path` names the locked image (same device and inode).
    func isSameFile(_ path: String) -> Bool {
        var a = stat(), b = stat()
        return !locks.isEmpty && stat(locks[0].path, &a) == 0 && stat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino
    }
}

/// The machine's virtio devices: their PCI transports, event loops, disks (device, backend and
/// lock, by position in `VMConfiguration.disks`) and the console.
final class MachineVirtio: Sendable {
    /// One virtio-blk disk.
    struct Disk {
        var spec: DiskSpec
        let device: VirtioBlock
        var backend: any BlockBackend
        var lock: DiskLock
    }
    /// One virtio-net NIC.
    struct NIC {
        let id: String
        let device: VirtioNet
        let backend: any NetBackend
    }
    private struct State {
        var loops: [EventLoop] = []
        var transports: [VirtioPCITransport] = []
        var mmioTransports: [VirtioMMIOTransport] = []
        var mmioSlots: [VirtioMMIOLayout.Slot] = []
        var disks: [Int: Disk] = [:]
        var nics: [NIC] = []
        var console: VirtioConsole?
        var balloon: VirtioBalloon?
        var started = false
        /// Disks closed for a migration target (`closeDisksForHandOff`), by index.
        var handedOff: [Int] = []
        /// The virtio-scsi adapter, and the image lock of each unit's medium (by target).
        var scsi: VirtioSCSI?
        var scsiLocks: [DiskLock] = []
        /// The devices the firmware can boot from, in attach order.
        var bootDevices: [BootDevice] = []
    }
    private let state = Mutex(State())
    /// Serializes disk replacements (opening files happens outside `state`).
    let replaceLock = Mutex(())

    /// The virtio console, when configured.
    var console: VirtioConsole? { state.withLock { $0.console } }
    /// The balloon, when configured.
    var balloon: VirtioBalloon? { state.withLock { $0.balloon } }

    /// Records the balloon device.
    func add(balloon: VirtioBalloon) { state.withLock { $0.balloon = balloon } }

    /// The virtio-mmio devices' windows and interrupts, in attach order.
    var mmioDevices: [VirtioMMIOLayout.Slot] { state.withLock { $0.mmioSlots } }

    /// Records a virtio-mmio transport at `slot` (shut down in `stop`, listed in `mmioDevices`).
    func add(mmio transport: VirtioMMIOTransport, slot: VirtioMMIOLayout.Slot) {
        state.withLock { s in
            s.mmioTransports.append(transport)
            s.mmioSlots.append(slot)
        }
    }

    func add(loop: EventLoop? = nil, transport: VirtioPCITransport? = nil, disk: (index: Int, disk: Disk)? = nil,
             nic: NIC? = nil, console: VirtioConsole? = nil) {
        state.withLock { s in
            if let nic { s.nics.append(nic) }
            if let loop { s.loops.append(loop) }
            if let transport { s.transports.append(transport) }
            if let disk { s.disks[disk.index] = disk.disk }
            if let console { s.console = console }
        }
    }

    /// The NICs, in `--net` order.
    var nics: [NIC] { state.withLock { $0.nics } }

    /// The devices the firmware can boot from, in attach order.
    var bootDevices: [BootDevice] { state.withLock { $0.bootDevices } }
    /// Records a bootable device.
    func add(bootDevice: BootDevice) { state.withLock { $0.bootDevices.append(bootDevice) } }

    /// Records the virtio-scsi adapter and its units' image locks.
    func add(scsi: VirtioSCSI, locks: [DiskLock]) {
        state.withLock { s in
            s.scsi = scsi
            s.scsiLocks = locks
        }
    }

    /// The media of the virtio-scsi units (none when there is no adapter).
    private var scsiBackends: [(String, any BlockBackend)] {
        guard let scsi = state.withLock({ $0.scsi }) else { return [] }
        return scsi.units.enumerated().flatMap { i, u in u.allMedia.map { ("virtio-scsi target \(i)", $0) } }
    }

    /// Disk `index` (its position in `VMConfiguration.disks`).
    func disk(_ index: Int) -> Disk? { state.withLock { $0.disks[index] } }

    /// Records that disk `index` now uses `backend` (opened from `spec`) under `lock`; returns false
    /// when the machine stopped meanwhile (the caller then closes them).
    func replaced(_ index: Int, spec: DiskSpec, backend: any BlockBackend, lock: DiskLock) -> Bool {
        state.withLock { s in
            guard s.disks[index] != nil else { return false }
            s.disks[index]?.spec = spec
            s.disks[index]?.backend = backend
            s.disks[index]?.lock = lock
            return true
        }
    }

    /// Holds the device threads still for a snapshot: parks the event loops, then lets each
    /// device finish its requests in flight (their completions reach the used rings). Guest
    /// memory and device state then stay put until `resumeAfterSnapshot()`.
    func quiesce() {
        let (loops, transports, mmio) = state.withLock { ($0.loops, $0.transports, $0.mmioTransports) }
        for l in loops { l.pause() }
        for t in transports { t.quiesce() }
        for t in mmio { t.quiesce() }
    }

    /// Writes every disk's cached data and metadata (qcow2 tables, refcounts) to its image file, so
    /// that the files match the guest's view: a snapshot's disks can then be copied (`vm clone`).
    /// Call it with the devices quiesced; throws naming the first disk that cannot be flushed.
    func flushDisks() throws {
        let disks = state.withLock { $0.disks.sorted { $0.key < $1.key }.map(\.value) }
        for d in disks {
            do { try d.backend.flush() } catch {
                throw VMMError.setup("cannot flush the disk \(d.spec.path) for the snapshot: \(error)")
            }
        }
        for (name, backend) in scsiBackends where !backend.isReadOnly {
            do { try backend.flush() } catch {
                throw VMMError.setup("cannot flush \(name) for the snapshot: \(error)")
            }
        }
    }

    /// The indices (in `VMConfiguration.disks`) of the machine's disks, in order.
    var diskIndices: [Int] { state.withLock { $0.disks.keys.sorted() } }

    /// Closes every disk image (data, metadata and header written) and releases its locks, so that a
    /// migration target can open and lock the same files. The devices must stay quiesced until
    /// `Machine.reopenDisksAfterHandOff` (or the machine stops). Throws naming the first disk that
    /// cannot be closed.
    func closeDisksForHandOff() throws {
        guard state.withLock({ $0.scsi }) == nil else {
            throw VMMError.setup("virtio-scsi units cannot be handed to a migration target (only virtio-blk disks can)")
        }
        let disks = state.withLock { $0.disks.sorted { $0.key < $1.key } }
        for (index, d) in disks {
            do { try d.backend.close() } catch {
                throw VMMError.setup("cannot close the disk \(d.spec.path) for the migration target: \(error)")
            }
            d.lock.release()
            state.withLock { $0.handedOff.append(index) }
        }
    }

    /// Puts back disks still to be opened again (a reopen that failed part-way, for the next try).
    func returnHandedOffDisks(_ indices: [Int]) {
        state.withLock { $0.handedOff = indices + $0.handedOff }
    }

    /// The disks `closeDisksForHandOff` closed (and forgets them): only those are opened again.
    func takeHandedOffDisks() -> [Int] {
        state.withLock { s in
            defer { s.handedOff = [] }
            return s.handedOff
        }
    }

    /// Lets the event loops run again after `quiesce()`.
    func resumeAfterSnapshot() {
        for l in state.withLock({ $0.loops }) { l.resume() }
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
        let (loops, transports, mmioTransports, backends, nics) = state.withLock { s in
            defer { s.disks = [:] } // NICs stay listed: their final counters go to the metrics
            return (s.loops, s.transports, s.mmioTransports, s.disks.values.map(\.backend), s.nics)
        }
        for l in loops { l.stop() }
        for t in transports { t.shutdown() }
        for t in mmioTransports { t.shutdown() }
        for n in nics { n.backend.close() }
        for b in backends {
            do { try b.close() } catch { logger.error("virtio-blk: flush at exit failed: \(error)") }
        }
        for (name, b) in scsiBackends {
            do { try b.close() } catch { logger.error("\(name): flush at exit failed: \(error)") }
        }
        let locks = state.withLock { s in defer { s.scsiLocks = [] }; return s.scsiLocks }
        for l in locks { l.release() }
    }
}

extension Machine {
    /// Gives a NIC of a firmware boot on PCI its PXE option ROM (`NetSpec.romFile`, iPXE's by default
    /// when installed) as an expansion ROM BAR, and a place in the boot order. A ROM named on the
    /// command line must be readable; `bootindex` needs a ROM.
    func setUpBootROM(_ nic: NetSpec, id: String, place: VirtioPlacement) throws {
        guard config.isFirmwareBoot, let slot = place.pciSlot else { return }
        let path: String?
        switch nic.romFile {
        case "": path = nil
        case let file?: path = file
        case nil: path = access(NetSpec.defaultROM, R_OK) == 0 ? NetSpec.defaultROM : nil
        }
        guard let path else {
            if nic.bootIndex != nil {
                throw VMMError.invalidValue(what: "--net", value: "bootindex=\(nic.bootIndex!)",
                                            reason: "NIC \(id) has no boot ROM (romfile=, or \(NetSpec.defaultROM) from the Debian package ipxe-qemu is missing)")
            }
            return
        }
        let rom: [UInt8]
        do {
            rom = try Self.readFile(path, limit: 16 << 20, what: "option ROM", limitName: "an expansion ROM's largest size")
        } catch {
            throw VMMError.invalidValue(what: "--net", value: "romfile=\(path)", reason: "\(error)")
        }
        guard rom.count >= 3, rom[0] == 0x55, rom[1] == 0xaa else {
            throw VMMError.invalidValue(what: "--net", value: "romfile=\(path)", reason: "not a PCI option ROM (no 55 AA signature)")
        }
        try pci.root.setExpansionROM(slot: slot, image: rom)
        virtio.add(bootDevice: .network(slot: slot, bootIndex: nic.bootIndex, label: "NIC \(id)"))
        logger.info("virtio-net \(id): boot ROM \(path) (\(rom.count) bytes)")
    }

    /// Builds the configured virtio devices and attaches them on the configured transport (`attachVirtio`:
    /// PCI in slot order, or virtio-mmio windows in order) in this order: disks (in `--disk` order), the NICs,
    /// the vsock device, then the console, then the entropy device. Each disk gets its own
    /// event-loop thread (its I/O is synchronous); the console and rng share one.
    func setUpVirtio() throws {
        let log = VirtioLog { [logger] message in logger.warning("\(message)") }
        for (i, disk) in config.disks.enumerated() where !disk.isSCSI {
            let (backend, lock) = try Self.openDisk(disk)
            let loop = try EventLoop(name: "virtio-blk\(i)")
            // Raw files have no lock in the backend: run requests in parallel (qcow2 serializes). With
            // O_DIRECT every request waits for the device, so allow as many as a typical queue depth.
            let threads = backend is RawFileBackend ? (disk.cache == "none" ? 8 : 4) : 0
            let serial = disk.id ?? "swiftkvm-disk\(i)"
            let device = VirtioBlock(backend: backend, serial: serial, ioThreads: threads, rateLimit: disk.rateLimit,
                                     eventLoop: loop, log: log)
            virtio.add(loop: loop, disk: (i, MachineVirtio.Disk(spec: disk, device: device, backend: backend, lock: lock)))
            let place = try attachVirtio(device, id: "virtio-blk\(i)", loop: loop, log: log)
            logger.info("virtio-blk \(disk.path) (\(backend.size) bytes\(disk.readOnly ? ", read-only" : "")) at \(place)")
            if let slot = place.pciSlot {
                virtio.add(bootDevice: .virtioBlock(slot: slot, bootIndex: disk.bootIndex, label: disk.path))
            }
        }
        try setUpSCSI(log: log)
        for (i, nic) in config.nets.enumerated() {
            let id = config.nicID(i), mac = config.nicMAC(i)
            let backend = try Self.openNetBackend(nic, id: id)
            do {
                let loop = try EventLoop(name: "virtio-net\(i)")
                let device = try VirtioNet(backend: backend, mac: mac, eventLoop: loop, rxRateLimit: nic.rxRateLimit,
                                           txRateLimit: nic.txRateLimit, log: log)
                virtio.add(loop: loop, nic: MachineVirtio.NIC(id: id, device: device, backend: backend))
                let place = try attachVirtio(device, id: "virtio-net-\(id)", loop: loop, log: log)
                logger.info("virtio-net \(id) (\(NetSpec.formatMAC(mac))) on \(backend.label) at \(place)")
                try setUpBootROM(nic, id: id, place: place)
            } catch {
                backend.close()
                throw error
            }
        }
        if let spec = config.vsock {
            let loop = try EventLoop(name: "virtio-vsock")
            let device: VirtioVsock
            do {
                device = try VirtioVsock(guestCID: spec.guestCID, udsPath: spec.udsPath, eventLoop: loop, log: log)
            } catch {
                throw VMMError.invalidValue(what: "--vsock", value: "uds=\(spec.udsPath)", reason: error.description)
            }
            virtio.add(loop: loop)
            let place: VirtioPlacement
            do {
                // attachVirtio registers the transport before it attaches it: stop() then shuts the device down
                // (removing its socket) on any later failure; this shuts it down when the transport was not made.
                place = try attachVirtio(device, id: "virtio-vsock", loop: loop, log: log)
            } catch {
                device.shutdown()
                throw error
            }
            logger.info("virtio-vsock cid \(spec.guestCID) on \(spec.udsPath) at \(place)")
        }
        guard config.virtioConsole || config.rng || config.balloon != nil else { return }
        let loop = try EventLoop(name: "virtio")
        virtio.add(loop: loop)
        if config.virtioConsole {
            let console = VirtioConsole(output: serialOutput, log: log)
            virtio.add(console: console)
            let place = try attachVirtio(console, id: "virtio-console", loop: loop, log: log)
            logger.debug("virtio-console at \(place)")
        }
        if config.rng {
            let rng = VirtioEntropy(rateLimit: config.rngRateLimit, eventLoop: loop, log: log)
            let place = try attachVirtio(rng, id: "virtio-rng", loop: loop, log: log)
            logger.debug("virtio-rng at \(place)")
        }
        if let spec = config.balloon {
            let balloon = VirtioBalloon(deflateOnOOM: spec.deflateOnOOM, statsInterval: spec.statsIntervalS,
                                        freePageReporting: spec.freePageReporting, eventLoop: loop, log: log)
            balloon.setTarget(pages: Self.balloonPages(mib: spec.amountMiB))
            virtio.add(balloon: balloon)
            let place = try attachVirtio(balloon, id: "virtio-balloon", loop: loop, log: log)
            logger.debug("virtio-balloon (\(spec.amountMiB) MiB) at \(place)")
        }
    }

    /// The virtio-scsi adapter with the `if=scsi` disks as targets 0, 1, … (LUN 0 each), in `--disk` order, on
    /// its own event-loop thread. A medium the guest ejects stays open and locked in the unit's tray until it is
    /// loaded again or the VM stops.
    func setUpSCSI(log: VirtioLog) throws {
        let specs = config.disks.filter(\.isSCSI)
        guard !specs.isEmpty else { return }
        guard specs.count <= 256 else {
            throw VMMError.invalidValue(what: "--disk", value: "if=scsi", reason: "\(specs.count) SCSI units, at most 256")
        }
        var units: [SCSILogicalUnit] = [], locks: [DiskLock] = []
        var opened: [any BlockBackend] = []
        do {
            for (target, disk) in specs.enumerated() {
                let (backend, lock) = try Self.openDisk(disk)
                opened.append(backend)
                locks.append(lock)
                if disk.isCDROM { try Self.checkOpticalImage(backend, path: disk.path) }
                if disk.isCDROM, backend.size % 2048 != 0 {
                    logger.warning("CD-ROM image \(disk.path) is \(backend.size) bytes, not whole 2048-byte blocks: the last \(backend.size % 2048) bytes are not readable")
                }
                units.append(SCSILogicalUnit(kind: disk.isCDROM ? .cdrom : .disk, backend: backend,
                                             serial: disk.id ?? "swiftkvm-scsi\(target)"))
            }
        } catch {
            for b in opened { try? b.close() }
            throw error
        }
        let loop = try EventLoop(name: "virtio-scsi")
        let device = VirtioSCSI(units: units, log: log)
        virtio.add(loop: loop)
        virtio.add(scsi: device, locks: locks)
        let place = try attachVirtio(device, id: "virtio-scsi", loop: loop, log: log)
        for (target, disk) in specs.enumerated() {
            logger.info("virtio-scsi target \(target): \(disk.isCDROM ? "CD-ROM" : "disk") \(disk.path) at \(place)")
            if let slot = place.pciSlot {
                virtio.add(bootDevice: .scsi(slot: slot, target: target, cdrom: disk.isCDROM, bootIndex: disk.bootIndex, label: disk.path))
            }
        }
    }

    /// Checks that a CD-ROM image is an ISO 9660 or UDF file system: a volume descriptor ("CD001", or UDF's
    /// volume recognition "BEA01") at sector 16 (byte 32769).
    static func checkOpticalImage(_ backend: any BlockBackend, path: String) throws {
        let at: UInt64 = 16 * 2048 + 1
        guard backend.size >= at + 5, let id = try? backend.read(at: at, count: 5),
              id == Array("CD001".utf8) || id == Array("BEA01".utf8) else {
            throw VMMError.invalidValue(what: "CD-ROM", value: path,
                                        reason: "not an ISO 9660 or UDF image (no volume descriptor at byte 32769)")
        }
    }

    /// 4 KiB balloon pages in `mib` MiB.
    static func balloonPages(mib: UInt32) -> UInt32 { UInt32(min(UInt64(mib) * 256, UInt64(UInt32.max))) }

    /// Asks the guest's balloon for `mib` MiB in total (`PATCH /balloon`).
    public func setBalloonTarget(mib: UInt32) throws {
        guard let b = virtio.balloon else { throw VMMError.invalidConfiguration("this VM has no balloon device") }
        b.setTarget(pages: Self.balloonPages(mib: mib))
    }

    /// Changes the balloon's statistics polling interval (`PATCH /balloon/statistics`).
    public func setBalloonStatsInterval(_ seconds: UInt32) throws {
        guard let b = virtio.balloon else { throw VMMError.invalidConfiguration("this VM has no balloon device") }
        b.setStatsInterval(seconds)
    }

    /// The balloon's figures and the guest's last statistics (nil: no balloon).
    public var balloonStatus: (status: VirtioBalloon.Status, statistics: [String: UInt64])? {
        virtio.balloon.map { ($0.status, $0.statistics) }
    }

    /// Opens the backend of NIC `id`. Errors name the NIC and what was wrong.
    static func openNetBackend(_ nic: NetSpec, id: String) throws -> any NetBackend {
        do throws(NetError) {
            switch nic.backend {
            case .tap(let name): return try TapBackend(name: name)
            case .fd(let fd): return try TapBackend(passedFD: fd)
            case .bridge(let name): return try TapBackend.onBridge(name)
            case .user(let forwards):
                return try PasstBackend(forwards: forwards.map {
                    PasstBackend.Forward(udp: $0.proto == "udp", hostAddress: $0.hostAddress, hostPort: $0.hostPort, guestPort: $0.guestPort)
                })
            }
        } catch {
            throw VMMError.invalidValue(what: "network interface", value: id, reason: error.description)
        }
    }

    /// Opens a disk image as `--disk` does: the image locks (`DiskLock`), then the
    /// format (given or probed; cache=none only for raw) and the backend. Errors name the path.
    static func openDisk(_ disk: DiskSpec, reusing existing: DiskLock? = nil) throws -> (any BlockBackend, DiskLock) {
        let lock = try existing ?? DiskLock(disk)
        do {
            let format = try disk.format.flatMap(ImageFormat.init(rawValue:)) ?? probeImageFormat(path: disk.path)
            if disk.cache == "none", format != .raw {
                throw VMMError.invalidValue(what: "--disk", value: disk.path, reason: "cache=none needs a raw image, this is \(format.rawValue)")
            }
            if format == .raw {
                // Raw images: no backend-wide lock and one preadv/pwritev per request.
                return (try RawFileBackend(path: disk.path, readOnly: disk.readOnly, direct: disk.cache == "none"), lock)
            }
            let options = ImageOpenOptions(readOnly: disk.readOnly, allowBackingFiles: disk.backingFiles, format: disk.format)
            return (try openDiskImage(path: disk.path, options: options), lock)
        } catch let e as VMMError {
            throw e
        } catch {
            var reason = "\(error)"
            if !disk.backingFiles, reason.lowercased().contains("backing") {
                reason += " (add backing_files=on to allow opening the backing file named inside the image)"
            }
            throw VMMError.invalidValue(what: "--disk", value: disk.path, reason: reason)
        }
    }

    /// Changes the rate limit of running disk `index` (its position in `VMConfiguration.disks`): for each bucket, nil keeps it, a bucket
    /// with size or refill time 0 removes it, any other replaces it by a full new one. A held
    /// request is retried at once.
    public func updateDiskRateLimit(index: Int, bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?) throws {
        guard let disk = virtio.disk(index) else {
            throw VMMError.invalidValue(what: "disk", value: "\(index)", reason: "no such virtio-blk disk")
        }
        disk.device.updateRateLimit(bandwidth: RateLimiter.BucketUpdate(bandwidth), ops: RateLimiter.BucketUpdate(ops))
    }

    /// Opens every disk again after `MachineVirtio.closeDisksForHandOff` (a migration that failed):
    /// new backends and locks on the same files. Throws naming the first disk that cannot be opened
    /// (another process took its lock meanwhile, or the file is gone); the guest must then stay paused.
    func reopenDisksAfterHandOff() throws {
        // Only the disks that were closed: a disk whose close failed still holds its image and locks.
        var pending = virtio.takeHandedOffDisks()
        defer { if !pending.isEmpty { virtio.returnHandedOffDisks(pending) } }
        while let index = pending.first {
            try virtio.replaceLock.withLock { _ in
                guard let disk = virtio.disk(index) else { return }
                var opened: (backend: any BlockBackend, lock: DiskLock)?
                do {
                    // The old backend was closed by the hand-off (closing again does nothing).
                    let old = try disk.device.replaceBackend {
                        let o = try Self.openDisk(disk.spec)
                        opened = o
                        return o.0
                    }
                    try? old?.close()
                } catch {
                    throw VMMError.setup("cannot open the disk \(disk.spec.path) again: \(error)")
                }
                guard let (backend, lock) = opened, virtio.replaced(index, spec: disk.spec, backend: backend, lock: lock) else {
                    throw VMMError.setup("cannot open the disk \(disk.spec.path) again: the machine is stopping")
                }
            }
            pending.removeFirst()
        }
    }

    /// Replaces the backing file of running disk `index` by `path` (Firecracker's "update block
    /// device path"): opened with the disk's read-only, format (probed when it was probed), cache
    /// and lock rules; swapped in between requests; the guest sees the new capacity after a
    /// configuration-change interrupt. The old image is flushed and closed, and its lock released.
    /// On any error the old image stays in use.
    public func replaceDiskImage(index: Int, path: String) throws {
        try virtio.replaceLock.withLock { _ in
            guard let disk = virtio.disk(index) else {
                throw VMMError.invalidValue(what: "disk", value: "\(index)", reason: "no such virtio-blk disk")
            }
            var spec = disk.spec
            spec.path = path
            // The same file again (a re-open): its lock is already ours.
            let reuse = disk.lock.isSameFile(path) ? disk.lock : nil
            var opened: (backend: any BlockBackend, lock: DiskLock)?
            let replaced: (any BlockBackend)?
            do {
                replaced = try disk.device.replaceBackend {
                    let o = try Self.openDisk(spec, reusing: reuse)
                    opened = o
                    return o.0
                }
            } catch let e as VMMError {
                throw e
            } catch {
                throw VMMError.invalidValue(what: "disk path", value: path, reason: "\(error)")
            }
            guard let old = replaced, let (backend, lock) = opened else {
                throw VMMError.invalidValue(what: "disk path", value: path, reason: "its read-only state differs from the disk's")
            }
            guard virtio.replaced(index, spec: spec, backend: backend, lock: lock) else {
                try? backend.close()
                throw VMMError.invalidValue(what: "disk path", value: path, reason: "the machine is stopping")
            }
            do { try old.close() } catch { logger.error("virtio-blk \(disk.device.serialString): flushing the replaced image \(disk.spec.path) failed: \(error)") }
            logger.info("virtio-blk \(disk.device.serialString): backing file is now \(path) (\(backend.size) bytes)")
        }
    }

    /// Changes the rate limits of running NIC `id` (Firecracker's PATCH /network-interfaces): for
    /// each bucket of each direction, nil keeps it, size or refill time 0 removes it, any other
    /// replaces it by a full new one.
    public func updateNetRateLimit(id: String, rx: (bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?),
                                   tx: (bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?)) throws {
        guard let nic = virtio.nics.first(where: { $0.id == id }) else {
            throw VMMError.invalidValue(what: "network interface", value: id, reason: "no such virtio-net NIC")
        }
        nic.device.rxRateLimiter.update(bandwidth: RateLimiter.BucketUpdate(rx.bandwidth), ops: RateLimiter.BucketUpdate(rx.ops))
        nic.device.txRateLimiter.update(bandwidth: RateLimiter.BucketUpdate(tx.bandwidth), ops: RateLimiter.BucketUpdate(tx.ops))
        // A direction held by its old limiter is retried at once.
        nic.device.rateLimitsChanged()
    }

    /// Host console input: to the UART and, when there is one, to the virtio console (hvc0), so
    /// that whichever the guest uses as its console reads it.
    public func enqueueConsoleInput(_ bytes: [UInt8]) {
        serial.enqueue(bytes)
        virtio.console?.enqueueInput(bytes)
    }
}
