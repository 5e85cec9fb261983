import ArgumentParser
import DiskImage
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm img`: disk image tool with qemu-img's spelling.
struct ImgCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "img",
        abstract: "Create, inspect, check and convert disk images (qemu-img compatible).",
        version: SwiftKVM.version + " (disk images as qemu-img 7.2 writes them)",
        subcommands: [ImgCreate.self, ImgInfo.self, ImgCheck.self, ImgConvert.self, ImgResize.self, ImgSnapshot.self,
                      ImgCommit.self, ImgRebase.self, ImgMap.self, ImgCompare.self, ImgBitmap.self, ImgMeasure.self, ImgDD.self, ImgAmend.self, ImgBench.self, ImgHelp.self]
    )
}

/// `swiftkvm img help [SUBCOMMAND]`: the help of one subcommand, as `qemu-img help` users expect.
struct ImgHelp: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "help", abstract: "Show the help of a subcommand.")
    @Argument(help: "The subcommand (create, info, check, …).") var subcommand: String?

    func run() throws {
        let subs = ImgCommand.configuration.subcommands.filter { $0 != ImgHelp.self }
        guard let name = subcommand else {
            print(ImgCommand.helpMessage())
            return
        }
        guard let sub = subs.first(where: { $0.configuration.commandName == name }) else {
            let names = subs.compactMap { $0.configuration.commandName }.joined(separator: ", ")
            throw ValidationError("unknown subcommand '\(name)' (known: \(names))")
        }
        print(ImgCommand.helpMessage(for: sub))
    }
}

/// Parses a size with an optional k/M/G/T/P/E suffix (powers of 1024), as qemu-img does.
func parseImgSize(_ s: String) throws -> UInt64 {
    var digits = s
    var mult: UInt64 = 1
    if let last = s.last, last.isLetter {
        digits = String(s.dropLast())
        switch last {
        case "b", "B": mult = 1
        case "k", "K": mult = 1 << 10
        case "m", "M": mult = 1 << 20
        case "g", "G": mult = 1 << 30
        case "t", "T": mult = 1 << 40
        case "p", "P": mult = 1 << 50
        case "e", "E": mult = 1 << 60
        default: throw ValidationError("invalid size '\(s)': unknown suffix '\(last)' (use k, M, G, T, P or E)")
        }
    }
    if let v = UInt64(digits) {
        let (r, o) = v.multipliedReportingOverflow(by: mult)
        if o { throw ValidationError("size '\(s)' is too large") }
        return r
    }
    // A decimal fraction ("1.5G") as qemu-img takes it; no exponents, signs, "inf" or "nan".
    let isDecimal = !digits.isEmpty && digits.allSatisfy { $0.isASCII && ($0.isNumber || $0 == ".") } &&
        digits.filter { $0 == "." }.count <= 1 && digits != "."
    if isDecimal, let d = Double(digits), d * Double(mult) < 1.8e19 { return UInt64(d * Double(mult)) }
    throw ValidationError("invalid size '\(s)'")
}

/// The `-o` options `swiftkvm img create` and `convert` take per format, with qemu-img's wording (`-o help`).
let createOptionHelp: [String: [(String, String)]] = [
    "qcow2": [
        ("backing_file=<str>", "File name of a base image"),
        ("backing_fmt=<str>", "Image format of the base image"),
        ("cluster_size=<size>", "qcow2 cluster size"),
        ("compat=<str>", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        ("compression_type=<str>", "Compression method used for image cluster compression (zlib, zstd)"),
        ("lazy_refcounts=<bool (on/off)>", "Postpone refcount updates"),
        ("preallocation=<str>", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        ("refcount_bits=<num>", "Width of a reference count entry in bits"),
        ("size=<size>", "Virtual disk size"),
    ],
    "raw": [
        ("preallocation=<str>", "Preallocation mode (allowed values: off, falloc, full)"),
        ("size=<size>", "Virtual disk size"),
    ],
]

/// Whether `options` ask for the option list (`-o help` or `-o ?`); prints it for `format` when they do.
func printedCreateOptionHelp(_ options: [String], format: String) throws -> Bool {
    guard options.contains(where: { $0 == "help" || $0 == "?" }) else { return false }
    guard let list = createOptionHelp[format] else { throw ValidationError("unknown format '\(format)' (qcow2 or raw)") }
    print("Supported \(format) options:")
    for (key, text) in list { print("  " + key.padded(to: 22) + " - " + text) }
    return true
}

/// Parses `-o key=value,key=value` options into create options. Returns whether the options set the size.
@discardableResult
func applyCreateOptions(_ opts: [String], to o: inout Qcow2CreateOptions, preallocation: inout String) throws -> Bool {
    var sizeGiven = false
    var refcountBitsGiven = false
    for group in opts {
        for item in group.split(separator: ",") {
            let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
            let key = kv[0], value = kv.count > 1 ? kv[1] : "on"
            switch key {
            case "cluster_size": o.clusterSize = try parseImgSize(value)
            case "compat":
                switch value {
                case "0.10", "v2": o.version = 2
                case "1.1", "v3": o.version = 3
                default: throw ValidationError("invalid compat '\(value)' (0.10 or 1.1)")
                }
            case "lazy_refcounts": o.lazyRefcounts = ["on", "true", "yes"].contains(value)
            case "refcount_bits":
                guard let b = UInt32(value) else { throw ValidationError("invalid refcount_bits '\(value)'") }
                o.refcountBits = b
                refcountBitsGiven = true
            case "preallocation":
                guard Preallocation(rawValue: value) != nil else {
                    throw ValidationError("invalid preallocation '\(value)' (off, metadata, falloc or full)")
                }
                preallocation = value
            case "compression_type":
                switch value {
                case "zlib": o.compressionType = .zlib
                case "zstd": o.compressionType = .zstd
                default: throw ValidationError("invalid compression_type '\(value)' (zlib or zstd)")
                }
            case "backing_file": o.backingFile = value
            case "backing_fmt": o.backingFormat = value
            case "size":
                o.size = try parseImgSize(value)
                sizeGiven = true
            default:
                throw ValidationError("unsupported option '\(key)' for qcow2 (known: backing_file, backing_fmt, cluster_size, compat, compression_type, lazy_refcounts, preallocation, refcount_bits, size)")
            }
        }
    }
    if o.version == 2 && !refcountBitsGiven { o.refcountBits = 16 }
    o.preallocation = Preallocation(rawValue: preallocation) ?? .off
    return sizeGiven
}

/// Resolves a backing name the way it will be resolved when the image is opened: relative to the image's folder.
func resolveBacking(_ name: String, relativeTo image: String) -> String {
    guard !name.hasPrefix("/") else { return name }
    guard let slash = image.lastIndex(of: "/") else { return name }
    return (slash == image.startIndex ? "" : String(image[..<slash])) + "/" + name
}

/// The help of `-U`/`--force-share`.
let forceShareHelp: ArgumentHelp = "Force share: open read-only without keeping writers out (qemu-img's -U); refused for writes."

/// Takes the image locks qemu-img takes on `path` and, with `followBacking`, its backing chain (see `ImageLock`);
/// release them with `releaseAll()` when the command is done.
func lockImage(_ path: String, format: String?, _ request: ImageLockRequest, followBacking: Bool = true) throws -> [ImageLock] {
    try lockImageChain(path: path, format: format.flatMap(ImageFormat.init(rawValue:)), request: request,
                       followBacking: followBacking)
}

/// qemu-img's refusal of `-U` for a command that writes the image.
func forceShareWriteError(_ path: String) -> DiskImageError {
    DiskImageError.invalid("Could not open '\(path)': force-share=on can only be used with read-only images")
}

/// Runs `body`, turning DiskImageError into "qemu-img: message" on stderr and exit code 1.
func imgRun(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let e as DiskImageError {
        writeText("swiftkvm img: \(e.message)\n", to: STDERR_FILENO)
        throw ExitCode(1)
    }
}

/// Creates an image of the given format. Shared by create and convert.
func createImage(path: String, format: String, size: UInt64?, backing: String?, backingFormat: String?,
                 options: [String], sync: Bool = true) throws {
    guard format == "raw" || format == "qcow2" else { throw ValidationError("unknown format '\(format)' (qcow2 or raw)") }
    // As qemu-img: the file is locked for writing before it is truncated, so an image in use is never overwritten.
    // A file the lock created is removed again when the image cannot be made.
    let existed = access(path, F_OK) == 0
    let lock: ImageLock
    do {
        lock = try ImageLock(path: path, permissions: [.write, .resize], unshared: .resize, create: true)
    } catch let e as DiskImageError where e.kind == .locked {
        throw DiskImageError(.locked, "\(path): \(e.message)")
    }
    defer { lock.release() }
    do {
        try createUnlocked(path: path, format: format, size: size, backing: backing, backingFormat: backingFormat,
                           options: options, sync: sync)
    } catch {
        if !existed { unlink(path) }
        throw error
    }
}

/// `createImage` once the file is locked.
private func createUnlocked(path: String, format: String, size: UInt64?, backing: String?, backingFormat: String?,
                            options: [String], sync: Bool) throws {
    switch format {
    case "raw":
        if backing != nil { throw ValidationError("raw images cannot have a backing file") }
        guard let size else { throw ValidationError("a size is required") }
        var preallocation = Preallocation.off
        for item in options.flatMap({ $0.split(separator: ",") }) {
            let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv[0] == "preallocation", kv.count == 2, let p = Preallocation(rawValue: kv[1]), p != .metadata else {
                throw ValidationError("unsupported option '\(item)' for raw (known: preallocation=off|falloc|full)")
            }
            preallocation = p
        }
        try RawImage.create(path: path, size: size, preallocation: preallocation).close()
    case "qcow2":
        var o = Qcow2CreateOptions(size: size ?? 0)
        o.syncOnCreate = sync
        var prealloc = "off"
        o.backingFile = backing
        o.backingFormat = backingFormat
        let sizeOption = try applyCreateOptions(options, to: &o, preallocation: &prealloc)
        if let b = o.backingFile {
            // As qemu-img 7: probing the backing file's format is refused (a raw file could pass for anything).
            guard let bf = o.backingFormat else {
                throw DiskImageError.invalid("\(path): Backing file specified without backing format (add -F qcow2 or -F raw)")
            }
            let full = resolveBacking(b, relativeTo: path)
            let bimg = try openDiskImage(path: full, options: .init(readOnly: true, format: bf))
            if size == nil && !sizeOption { o.size = bimg.size }
            try bimg.close()
        } else if size == nil && !sizeOption {
            throw ValidationError("a size is required")
        }
        try Qcow2Image.create(path: path, options: o)
    default:
        throw ValidationError("unknown format '\(format)' (qcow2 or raw)")
    }
}

struct ImgCreate: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a disk image.")
    @Option(name: .customShort("f"), help: "Format: qcow2 or raw.") var format = "raw"
    @Option(name: .customShort("b"), help: "Backing file.") var backing: String?
    @Option(name: .customShort("F"), help: "Backing file format.") var backingFormat: String?
    @Option(name: .customShort("o"), help: "Options: cluster_size, compat, lazy_refcounts, refcount_bits, preallocation (off, metadata, falloc, full), compression_type; raw: preallocation (off, falloc, full).") var options: [String] = []
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "Image file (not needed with -o help).") var file: String?
    @Argument(help: "Size (k, M, G, T suffixes).") var size: String?

    func run() throws {
        if try printedCreateOptionHelp(options, format: format) { return }
        guard let file else { throw ValidationError("missing the image file") }
        try imgRun {
            let sz = try size.map(parseImgSize)
            try createImage(path: file, format: format, size: sz, backing: backing, backingFormat: backingFormat, options: options)
            if !quiet { print("Formatting '\(file)', fmt=\(format) size=\(sz ?? 0)") }
        }
    }
}

/// `qemu-img info` data for one image.
func infoJSON(_ img: BlockBackend, path: String) throws -> ImgJSON {
    var kv: [(String, ImgJSON)] = []
    let actual: UInt64
    if let q = img as? Qcow2Image {
        let snaps = try q.snapshots()
        if !snaps.isEmpty {
            kv.append(("snapshots", .array(snaps.map { s in
                var e: [(String, ImgJSON)] = []
                if let ic = s.icount, ic != UInt64.max { e.append(("icount", .uint(ic))) }
                e += [("vm-clock-nsec", .uint(s.vmClockNanoseconds % 1_000_000_000)), ("name", .string(s.name)),
                      ("date-sec", .uint(UInt64(s.dateSeconds))), ("date-nsec", .uint(UInt64(s.dateNanoseconds))),
                      ("vm-clock-sec", .uint(s.vmClockNanoseconds / 1_000_000_000)), ("id", .string(s.id)),
                      ("vm-state-size", .uint(s.vmStateSize))]
                return .object(e)
            })))
        }
        actual = try q.allocatedBytes()
        let h = q.header
        if h.backingFile != nil, let f = h.backingFormat { kv.append(("backing-filename-format", .string(f))) }
        kv += [("virtual-size", .uint(q.size)), ("filename", .string(path)), ("cluster-size", .uint(q.clusterSize)),
               ("format", .string("qcow2")), ("actual-size", .uint(actual))]
        var data: [(String, ImgJSON)] = []
        if h.version >= 3 {
            data = [("compat", .string("1.1")), ("compression-type", .string(h.compressionType == .zstd ? "zstd" : "zlib")),
                    ("lazy-refcounts", .bool(h.compatible.contains(.lazyRefcounts)))]
            if let bms = try? q.bitmaps(), !bms.isEmpty {
                data.append(("bitmaps", .array(bms.map { b in
                    .object([("flags", .array(b.flagNames.map { .string($0) })), ("name", .string(b.name)),
                             ("granularity", .uint(b.granularity))])
                })))
            }
            data += [("refcount-bits", .uint(UInt64(h.refcountBits))), ("corrupt", .bool(h.incompatible.contains(.corrupt))),
                    ("extended-l2", .bool(h.incompatible.contains(.extendedL2)))]
        } else {
            data = [("compat", .string("0.10")), ("compression-type", .string("zlib")), ("refcount-bits", .uint(16))]
        }
        kv.append(("format-specific", .object([("type", .string("qcow2")), ("data", .object(data))])))
        if let b = h.backingFile {
            kv.append(("full-backing-filename", .string(resolveBacking(b, relativeTo: path))))
            kv.append(("backing-filename", .string(b)))
        }
        kv.append(("dirty-flag", .bool(h.incompatible.contains(.dirty))))
    } else if let r = img as? RawImage {
        kv = [("virtual-size", .uint(r.size)), ("filename", .string(path)), ("format", .string("raw")),
              ("actual-size", .uint(try r.allocatedBytes())), ("dirty-flag", .bool(false))]
    }
    return .object(kv)
}

func humanSize(_ v: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    var d = Double(v)
    var i = 0
    while d >= 1024 && i < units.count - 1 { d /= 1024; i += 1 }
    if i == 0 { return "\(v) B" }
    let s = cFormat("%.3g", d)
    return "\(s) \(units[i])"
}

func snapshotTable(_ snaps: [Qcow2Snapshot]) -> String {
    var out = "Snapshot list:\n"
    out += "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n"
    for s in snaps {
        let date = localDateTime(Int(s.dateSeconds))
        let secs = s.vmClockNanoseconds / 1_000_000_000
        let clock = cFormat("%02llu:%02llu:%02llu.%03llu", secs / 3600, (secs / 60) % 60, secs % 60, (s.vmClockNanoseconds / 1_000_000) % 1000)
        let ic = s.icount.map { $0 == UInt64.max ? "" : String($0) } ?? ""
        out += s.id.padded(to: 10) + s.name.padded(to: 18)
        out += String(repeating: " ", count: max(0, 7 - humanSize(s.vmStateSize).count)) + humanSize(s.vmStateSize)
        out += " \(date) \(clock) " + String(repeating: " ", count: max(0, 10 - ic.count)) + ic + "\n"
    }
    return out
}

struct ImgInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show information about an image.")
    @Option(name: .customShort("f")) var format: String?
    @Option(name: .customLong("output"), help: "human or json") var output = "human"
    @Flag(name: .customLong("backing-chain")) var backingChain = false
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: forceShareHelp)
    var forceShare = false
    @Argument var file: String

    func run() throws {
        try imgRun {
            let locks = try lockImage(file, format: format, .info(forceShare: forceShare), followBacking: backingChain)
            defer { locks.releaseAll() }
            let img = try openDiskImage(path: file, options: .init(readOnly: true, format: format))
            defer { try? img.close() }
            var chain: [(BlockBackend, String)] = [(img, file)]
            if backingChain {
                var cur = img
                while let q = cur as? Qcow2Image, let b = q.backing, let p = q.backingPath {
                    chain.append((b, p)); cur = b
                }
            }
            let infos = try chain.map { try infoJSON($0.0, path: $0.1) }
            if output == "json" {
                print(backingChain ? ImgJSON.array(infos).render() : infos[0].render())
                return
            }
            for (n, (im, p)) in chain.enumerated() {
                if n > 0 { print("") }
                print("image: \(p)")
                print("file format: \(im is Qcow2Image ? "qcow2" : "raw")")
                print("virtual size: \(humanSize(im.size)) (\(im.size) bytes)")
                if let q = im as? Qcow2Image {
                    print("disk size: \(humanSize(try q.allocatedBytes()))")
                    print("cluster_size: \(q.clusterSize)")
                    if let b = q.header.backingFile {
                        print("backing file: \(b)")
                        if let f = q.header.backingFormat { print("backing file format: \(f)") }
                    }
                    let snaps = try q.snapshots()
                    if !snaps.isEmpty { print(snapshotTable(snaps), terminator: "") }
                    let h = q.header
                    print("Format specific information:")
                    print("    compat: \(h.version >= 3 ? "1.1" : "0.10")")
                    print("    compression type: \(h.compressionType == .zstd ? "zstd" : "zlib")")
                    if h.version >= 3 { print("    lazy refcounts: \(h.compatible.contains(.lazyRefcounts))") }
                    if let bms = try? q.bitmaps(), !bms.isEmpty {
                        print("    bitmaps:")
                        for (i, b) in bms.enumerated() {
                            print("        [\(i)]:")
                            print("            flags:")
                            for (k, f) in b.flagNames.enumerated() { print("                [\(k)]: \(f)") }
                            print("            name: \(b.name)")
                            print("            granularity: \(b.granularity)")
                        }
                    }
                    print("    refcount bits: \(h.refcountBits)")
                    if h.version >= 3 {
                        print("    corrupt: \(h.incompatible.contains(.corrupt))")
                        print("    extended l2: \(h.incompatible.contains(.extendedL2))")
                    }
                } else if let r = im as? RawImage {
                    print("disk size: \(humanSize(try r.allocatedBytes()))")
                }
            }
        }
    }
}

struct ImgCheck: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check", abstract: "Check (and repair) an image's consistency. Exit codes: 0 clean, 1 check failed or bad usage, 2 corruptions, 3 leaks, 63 format without checks.")
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: forceShareHelp)
    var forceShare = false
    @Option(name: .customShort("f")) var format: String?
    @Option(name: .customShort("r"), help: "Repair: leaks or all.") var repair: String?
    @Option(name: .customLong("output")) var output = "human"
    @Flag(name: .customShort("q")) var quiet = false
    @Argument var file: String

    func run() throws {
        var mode: Qcow2RepairMode?
        if let r = repair {
            guard let m = Qcow2RepairMode(rawValue: r) else {
                writeText("swiftkvm img: -r must be 'leaks' or 'all', not '\(r)'\n", to: STDERR_FILENO)
                throw ExitCode(1)
            }
            mode = m
        }
        let result: Qcow2CheckResult
        do {
            if (try format ?? probeImageFormat(path: file).rawValue) != "qcow2" {
                writeText("swiftkvm img: This image format does not support checks\n", to: STDERR_FILENO)
                throw ExitCode(63)
            }
            if mode != nil && forceShare { throw forceShareWriteError(file) }
            let locks = try lockImage(file, format: format, mode == nil ? .read(forceShare: forceShare) : .write)
            defer { locks.releaseAll() }
            var opts = ImageOpenOptions(readOnly: mode == nil, ignoreBackingFile: true)
            opts.forCheck = true
            let img = try Qcow2Image(path: file, options: opts)
            result = try img.check(repair: mode)
            try img.close()
        } catch let e as DiskImageError {
            // Errors before the check (a lock held elsewhere, -U with -r) are worded as qemu-img words them.
            let opening = e.kind == .locked || e.message.hasPrefix("Could not open")
            writeText("swiftkvm img: \(opening ? "" : "Check failed: ")\(e.message)\n", to: STDERR_FILENO)
            throw ExitCode(1)
        }
        if output == "json" {
            var kv: [(String, ImgJSON)] = [("image-end-offset", .uint(result.imageEndOffset)),
                                           ("total-clusters", .uint(result.totalClusters)),
                                           ("check-errors", .int(Int64(result.checkErrors))),
                                           ("allocated-clusters", .uint(result.allocatedClusters)),
                                           ("filename", .string(file)), ("format", .string("qcow2"))]
            if result.leaks > 0 { kv.append(("leaks", .int(Int64(result.leaks)))) }
            if result.corruptions > 0 { kv.append(("corruptions", .int(Int64(result.corruptions)))) }
            if result.leaksFixed > 0 { kv.append(("leaks-fixed", .int(Int64(result.leaksFixed)))) }
            if result.corruptionsFixed > 0 { kv.append(("corruptions-fixed", .int(Int64(result.corruptionsFixed)))) }
            if result.fragmentedClusters > 0 { kv.append(("fragmented-clusters", .uint(result.fragmentedClusters))) }
            if result.compressedClusters > 0 { kv.append(("compressed-clusters", .uint(result.compressedClusters))) }
            print(ImgJSON.object(kv).render())
        }
        // The findings go to stderr, as qemu-img prints them.
        if !quiet {
            for m in result.messages.prefix(1000) { writeText(m + "\n", to: STDERR_FILENO) }
        }
        if output != "json" && !quiet && result.checkErrors == 0 {
            if result.leaksFixed > 0 || result.corruptionsFixed > 0 {
                print("The following inconsistencies were found and repaired:\n")
                print("    \(result.leaksFixed) leaked clusters")
                print("    \(result.corruptionsFixed) corruptions\n")
                print("Double checking the fixed image now...")
            }
            if result.corruptions == 0 && result.leaks == 0 {
                print("No errors were found on the image.")
            } else {
                if result.corruptions > 0 { print("\n\(result.corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.") }
                if result.leaks > 0 { print("\n\(result.leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.") }
            }
            let t = Double(max(result.totalClusters, 1))
            print(cFormat("%llu/%llu = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters",
                         result.allocatedClusters, result.totalClusters, Double(result.allocatedClusters) * 100 / t,
                         Double(result.fragmentedClusters) * 100 / Double(max(result.allocatedClusters, 1)),
                         Double(result.compressedClusters) * 100 / Double(max(result.allocatedClusters, 1))))
            print("Image end offset: \(result.imageEndOffset)")
        }
        if result.checkErrors > 0 {
            writeText("swiftkvm img: Check failed\(mode != nil ? ": the image was not repaired" : "")\n", to: STDERR_FILENO)
            throw ExitCode(1)
        }
        if mode != nil && (result.corruptions > 0 || (mode == .all && result.leaks > 0)) {
            // Never let a repair look like a success when the image is still not clean.
            writeText("swiftkvm img: the repair did not make the image clean: \(result.corruptions) corruptions and \(result.leaks) leaked clusters remain\n", to: STDERR_FILENO)
        }
        if result.corruptions > 0 { throw ExitCode(2) }
        if result.leaks > 0 { throw ExitCode(3) }
    }
}

/// Prints a qemu-img style progress indicator.
final class ProgressPrinter {
    var last = -1.0
    func update(_ done: UInt64, _ total: UInt64) {
        let pct = total == 0 ? 100 : Double(done) * 100 / Double(total)
        if pct - last >= 1 || done == total {
            last = pct
            print(cFormat("    (%.2f/100%%)\r", pct), terminator: "")
            fflush(nil)
        }
    }
    func finish() { print("") }
}

struct ImgConvert: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "convert", abstract: "Convert an image to another format (sparse copy).")
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: forceShareHelp)
    var forceShare = false
    @Option(name: .customShort("f")) var sourceFormat: String?
    @Option(name: .customShort("O")) var outputFormat = "raw"
    @Flag(name: .customShort("c"), help: "Compress (qcow2 output).") var compress = false
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Option(name: .customShort("B"), help: "Backing file of the output.") var backing: String?
    @Option(name: .customShort("F"), help: "Backing file format.") var backingFormat: String?
    @Option(name: .customShort("o")) var options: [String] = []
    @Option(name: .customShort("t"), help: "Output cache mode: unsafe (default, no fdatasync, as qemu-img) or writeback/none (flush at the end).") var cache = "unsafe"
    @Argument var source: String
    @Argument var destination: String

    func run() throws {
        try imgRun {
            let srcLocks = try lockImage(source, format: sourceFormat, .convertSource(forceShare: forceShare))
            defer { srcLocks.releaseAll() }
            let src = try openDiskImage(path: source, options: .init(readOnly: true, format: sourceFormat))
            try createImage(path: destination, format: outputFormat, size: src.size, backing: backing,
                            backingFormat: backingFormat, options: options, sync: cache != "unsafe")
            let dstLocks = try lockImage(destination, format: outputFormat, .write, followBacking: false)
            defer { dstLocks.releaseAll() }
            var dopts = ImageOpenOptions(readOnly: false, format: outputFormat)
            dopts.unsafeNoSync = cache == "unsafe"
            let dst = try openDiskImage(path: destination, options: dopts)
            let p = progress ? ProgressPrinter() : nil
            try convertImage(from: src, to: dst, compress: compress, progress: p.map { pp in { pp.update($0, $1) } })
            p?.finish()
            try dst.close()
            try src.close()
        }
    }
}

struct ImgResize: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "resize", abstract: "Change the virtual size of an image.")
    @Option(name: .customShort("f")) var format: String?
    @Flag(name: .customLong("shrink")) var shrink = false
    @Option(name: .customLong("preallocation"), help: "For the added part: off, metadata (qcow2), falloc or full.")
    var preallocation = "off"
    @Argument var file: String
    @Argument var size: String

    func run() throws {
        try imgRun {
            let locks = try lockImage(file, format: format, .write)
            defer { locks.releaseAll() }
            let img = try openDiskImage(path: file, options: .init(readOnly: false, format: format))
            var target: UInt64
            if size.hasPrefix("+") {
                target = img.size + (try parseImgSize(String(size.dropFirst())))
            } else if size.hasPrefix("-") {
                let d = try parseImgSize(String(size.dropFirst()))
                guard d <= img.size else { throw DiskImageError.invalid("cannot shrink \(file) below zero bytes") }
                target = img.size - d
            } else {
                target = try parseImgSize(size)
            }
            guard let mode = Preallocation(rawValue: preallocation) else {
                throw ValidationError("invalid --preallocation '\(preallocation)' (off, metadata, falloc or full)")
            }
            let oldSize = img.size
            if mode != .off && target < oldSize {
                throw DiskImageError.invalid("\(file): --preallocation needs a size that grows the image")
            }
            try img.resize(to: target, allowShrink: shrink)
            if let q = img as? Qcow2Image { try q.preallocate(from: oldSize, mode: mode) }
            if let r = img as? RawImage { try r.preallocate(from: oldSize, mode: mode) }
            try img.close()
            print("Image resized.")
        }
    }
}

struct ImgSnapshot: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "snapshot", abstract: "List, create, apply or delete internal snapshots.")
    @Flag(name: .customShort("l")) var list = false
    @Option(name: .customShort("c")) var create: String?
    @Option(name: .customShort("a")) var apply: String?
    @Option(name: .customShort("d")) var delete: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp) var forceShare = false
    @Argument var file: String

    func run() throws {
        try imgRun {
            let writable = create != nil || apply != nil || delete != nil
            if writable && forceShare { throw forceShareWriteError(file) }
            let locks = try lockImage(file, format: "qcow2", writable ? .write : .read(forceShare: forceShare))
            defer { locks.releaseAll() }
            let img = try Qcow2Image(path: file, options: .init(readOnly: !writable))
            if let n = create { try img.createSnapshot(name: n) }
            if let n = apply { try img.applySnapshot(n) }
            if let n = delete { try img.deleteSnapshot(n) }
            if list || !writable {
                let snaps = try img.snapshots()
                if !snaps.isEmpty { print(snapshotTable(snaps), terminator: "") }
            }
            try img.close()
        }
    }
}

/// `img bitmap`: qemu-img's persistent dirty bitmap operations, applied in the order given.
struct ImgBitmap: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bitmap",
        abstract: "Add, remove, clear, enable, disable or merge a persistent dirty bitmap of a qcow2 image.")
    @Flag(name: .customLong("add"), help: "Add an empty bitmap (enabled unless --disable).") var add = false
    @Flag(name: .customLong("remove"), help: "Remove the bitmap.") var remove = false
    @Flag(name: .customLong("clear"), help: "Clear every bit.") var clear = false
    @Flag(name: .customLong("enable"), help: "Track writes.") var enable = false
    @Flag(name: .customLong("disable"), help: "Stop tracking writes.") var disable = false
    @Option(name: .customLong("merge"), help: "OR the bits of bitmap SOURCE (of -b SOURCE_FILE, or of this image) into the bitmap.") var merge: String?
    @Option(name: .customShort("b"), help: "The image holding the --merge source bitmap.") var sourceFile: String?
    @Option(name: .customShort("F"), help: "The format of -b (qcow2).") var sourceFormat: String?
    @Option(name: .customShort("g"), help: "Granularity of --add (power of two, 512 B to 2 GiB; default: the cluster size within 4k-64k).") var granularity: String?
    @Option(name: .customShort("f")) var format: String?
    @Argument var file: String
    @Argument var bitmap: String

    func validate() throws {
        guard add || remove || clear || enable || disable || merge != nil else {
            throw ValidationError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
        }
        if granularity != nil && !add { throw ValidationError("granularity only supported with --add") }
        if sourceFile != nil && merge == nil { throw ValidationError("-b requires --merge") }
        if sourceFormat != nil && sourceFile == nil { throw ValidationError("-F requires -b") }
        if let f = format, f != "qcow2" { throw ValidationError("format '\(f)' has no persistent bitmaps (qcow2 only)") }
    }

    /// The operations in command-line order, as qemu-img applies them.
    func operations() -> [String] {
        let names = ["--add", "--remove", "--clear", "--enable", "--disable", "--merge"]
        var seen: [String] = []
        for a in CommandLine.arguments.dropFirst() {
            let n = a.split(separator: "=", maxSplits: 1).first.map(String.init) ?? a
            if names.contains(n) && !seen.contains(n) { seen.append(n) }
        }
        let wanted = zip(names, [add, remove, clear, enable, disable, merge != nil]).filter { $0.1 }.map { $0.0 }
        return seen.filter { wanted.contains($0) } + wanted.filter { !seen.contains($0) }
    }

    func run() throws {
        try imgRun {
            let g = try granularity.map { try parseImgSize($0) }
            let locks = try lockImage(file, format: "qcow2", .write)
            defer { locks.releaseAll() }
            guard (try probeImageFormat(path: file)) == .qcow2 else {
                throw DiskImageError(.unsupported, "\(file): persistent bitmaps need a qcow2 image")
            }
            let img = try Qcow2Image(path: file, options: .init(readOnly: false, ignoreBackingFile: true))
            for op in operations() {
                switch op {
                case "--add": try img.addBitmap(bitmap, granularity: g, enabled: !disable)
                case "--remove": try img.removeBitmap(bitmap)
                case "--clear": try img.clearBitmap(bitmap)
                case "--enable": try img.setBitmapEnabled(bitmap, true)
                case "--disable": if !add { try img.setBitmapEnabled(bitmap, false) }
                case "--merge":
                    let source = merge!
                    if let sf = sourceFile {
                        if let f = sourceFormat, f != "qcow2" { throw DiskImageError(.unsupported, "\(sf): persistent bitmaps need a qcow2 image") }
                        let path = resolveBacking(sf, relativeTo: file)
                        let slocks = try lockImage(path, format: "qcow2", .read(forceShare: false), followBacking: false)
                        defer { slocks.releaseAll() }
                        let src = try Qcow2Image(path: path, options: .init(readOnly: true, ignoreBackingFile: true))
                        guard let sb = try src.bitmaps().first(where: { $0.name == source }) else {
                            throw DiskImageError.invalid("\(path): Dirty bitmap '\(source)' not found")
                        }
                        try img.mergeBitmap(into: bitmap, sourceBits: try src.bitmapData(source), sourceGranularity: sb.granularity)
                        try src.close()
                    } else {
                        guard let sb = try img.bitmaps().first(where: { $0.name == source }) else {
                            throw DiskImageError.invalid("\(file): Dirty bitmap '\(source)' not found")
                        }
                        try img.mergeBitmap(into: bitmap, sourceBits: try img.bitmapData(source), sourceGranularity: sb.granularity)
                    }
                default: break
                }
            }
            try img.close()
        }
    }
}

struct ImgCommit: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "commit", abstract: "Write an overlay's changes into its backing image and empty the overlay.")
    @Option(name: .customShort("f")) var format: String?
    @Flag(name: .customShort("p")) var progress = false
    @Flag(name: .customShort("d"), help: "Do not empty the overlay.") var keep = false
    @Argument var file: String

    func run() throws {
        try imgRun {
            let locks = try lockImage(file, format: "qcow2", .write)
            defer { locks.releaseAll() }
            let top = try Qcow2Image(path: file, options: .init(readOnly: false))
            guard let bpath = top.backingPath else { throw DiskImageError.invalid("\(file) has no backing file to commit to") }
            // As qemu-img: the base's read lock (taken with the chain) becomes a write lock.
            if locks.count > 1 {
                let bfmt = try top.header.backingFormat.flatMap(ImageFormat.init(rawValue:)) ?? probeImageFormat(path: bpath)
                try locks[1].update(for: .write, format: bfmt)
            }
            let base = try openDiskImage(path: bpath, options: .init(readOnly: false, format: top.header.backingFormat))
            let p = progress ? ProgressPrinter() : nil
            try commitImage(top: top, base: base, emptyTop: !keep, progress: p.map { pp in { pp.update($0, $1) } })
            p?.finish()
            try base.close()
            try top.close()
            print("Image committed.")
        }
    }
}

struct ImgRebase: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rebase", abstract: "Change the backing file of an image.")
    @Option(name: .customShort("f")) var format: String?
    @Flag(name: .customShort("u"), help: "Unsafe: only change the name.") var unsafe = false
    @Option(name: .customShort("b")) var backing: String
    @Option(name: .customShort("F")) var backingFormat: String?
    @Flag(name: .customShort("p")) var progress = false
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: "Open the backing files (old and new) without keeping writers out (qemu-img's -U); the image is locked for writing.")
    var forceShare = false
    @Argument var file: String

    func run() throws {
        try imgRun {
            // The image is locked for writing; its backing chain (not opened by -u) and the new backing file for
            // reading, or with -U force-shared, as qemu-img does.
            var locks = try lockImage(file, format: "qcow2", .write, followBacking: !unsafe && !forceShare)
            defer { locks.releaseAll() }
            let name: String? = backing.isEmpty ? nil : backing
            let fmt = backingFormat
            if name != nil && fmt == nil {
                throw DiskImageError.invalid("\(file): could not change the backing file to '\(backing)': backing format must be specified (-F qcow2 or -F raw)")
            }
            if unsafe {
                let img = try Qcow2Image(path: file, options: .init(readOnly: false, ignoreBackingFile: true))
                try img.setBackingFile(name, format: fmt)
                try img.close()
                return
            }
            let img = try Qcow2Image(path: file, options: .init(readOnly: false))
            if forceShare, let old = img.backingPath {
                locks += try lockImage(old, format: img.header.backingFormat, .read(forceShare: true))
            }
            if let name {
                locks += try lockImage(resolveBacking(name, relativeTo: file), format: fmt, .read(forceShare: forceShare))
            }
            let nb = try name.map { try openDiskImage(path: resolveBacking($0, relativeTo: file), options: .init(readOnly: true, format: fmt)) }
            try rebaseImage(img, newBacking: nb, name: name, format: fmt)
            try nb?.close()
            try img.close()
        }
    }
}

struct ImgMap: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "map", abstract: "Show the allocation map of an image.")
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: forceShareHelp)
    var forceShare = false
    @Option(name: .customShort("f")) var format: String?
    @Option(name: .customLong("output")) var output = "human"
    @Argument var file: String

    func run() throws {
        try imgRun {
            let locks = try lockImage(file, format: format, .read(forceShare: forceShare))
            defer { locks.releaseAll() }
            let img = try openDiskImage(path: file, options: .init(readOnly: true, format: format))
            let entries = try mapImage(img)
            if output == "json" {
                let lines = entries.map { e in
                    var s = "{ \"start\": \(e.start), \"length\": \(e.length), \"depth\": \(e.depth), \"present\": \(e.present), \"zero\": \(e.zero), \"data\": \(e.data)"
                    if let o = e.offset { s += ", \"offset\": \(o)" }
                    return s + "}"
                }
                print("[" + lines.joined(separator: ",\n") + "]")
            } else {
                // The file that really holds each extent: the image at the extent's depth in the backing chain.
                var chain = [file]
                var cur: BlockBackend = img
                while let q = cur as? Qcow2Image, let b = q.backing, let p = q.backingPath {
                    chain.append(p)
                    cur = b
                }
                print("Offset          Length          Mapped to       File")
                for e in entries where e.data {
                    let holder = e.depth < chain.count ? chain[e.depth] : file
                    print(cFormat("%#-16llx%#-16llx%#-16llx", e.start, e.length, e.offset ?? 0) + holder)
                }
            }
            try img.close()
        }
    }
}

/// `img amend`: changes options of an existing qcow2 image (qemu-img amend -o): compat, lazy_refcounts, size.
struct ImgAmend: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "amend",
        abstract: "Change options of a qcow2 image: compat (0.10 or 1.1), lazy_refcounts, size (qemu-img amend -o).")
    @Option(name: .customShort("o"), help: "compat=0.10|1.1, lazy_refcounts=on|off, size=SIZE (comma-separated; repeatable).") var options: [String] = []
    @Option(name: .customShort("f"), help: "The image's format (qcow2; probed when not given).") var format: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Flag(name: .customLong("force"), help: "Accepted for qemu-img compatibility.") var force = false
    @Argument var file: String

    func run() throws {
        try imgRun {
            func fail(_ message: String) -> DiskImageError { DiskImageError(.invalidArgument, message) }
            guard !options.isEmpty else { throw fail("Must specify options (-o)") }
            var a = Qcow2Amendment()
            for item in options.flatMap({ $0.split(separator: ",") }).map(String.init) {
                let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
                let key = kv[0], value = kv.count > 1 ? kv[1] : "on"
                switch key {
                case "compat":
                    switch value {
                    case "0.10", "v2": a.version = 2
                    case "1.1", "v3": a.version = 3
                    default: throw fail("Unknown compatibility level \(value)")
                    }
                case "lazy_refcounts":
                    switch value {
                    case "on", "true", "yes": a.lazyRefcounts = true
                    case "off", "false", "no": a.lazyRefcounts = false
                    default: throw fail("Parameter 'lazy_refcounts' expects 'on' or 'off'")
                    }
                case "size":
                    guard let n = try? parseImgSize(value) else { throw fail("Parameter 'size' expects a size: '\(value)'") }
                    a.size = n
                case "backing_file", "backing_fmt":
                    throw fail("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
                case "cluster_size", "preallocation", "compression_type", "extended_l2", "data_file", "encrypt":
                    throw fail("Invalid parameter '\(key)'\nThis option is only supported for image creation")
                case "refcount_bits":
                    throw DiskImageError(.unsupported, "\(file): changing refcount_bits is not supported yet (convert with -o refcount_bits=N instead)")
                default:
                    throw fail("Invalid parameter '\(key)' (amend takes compat, lazy_refcounts, size)")
                }
            }
            let locks = try lockImage(file, format: format, .write)
            defer { locks.releaseAll() }
            let img = try openDiskImage(path: file, options: .init(readOnly: false, format: format))
            guard let q = img as? Qcow2Image else {
                try? img.close()
                throw fail("Format driver 'raw' does not support option amendment")
            }
            do { try q.amend(a) } catch {
                try? q.close()
                throw error
            }
            try q.close()
        }
    }
}

/// `img dd`: qemu-img dd: copies `count` blocks of `bs` bytes from `if`, after `skip` blocks, into a new image `of`.
/// The output size follows qemu-img 7.2: min(count × bs, input size), less skip × bs; a skip past that end prints
/// "cannot skip to specified offset" and leaves an empty output, with status 0, as qemu-img does.
struct ImgDD: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dd",
        abstract: "Copy blocks of an image into a new image, as dd (qemu-img dd: bs=, count=, skip=, if=, of=).")
    @Option(name: .customShort("f"), help: "The input's format (probed when not given).") var format: String?
    @Option(name: .customShort("O"), help: "The output's format: raw (default) or qcow2.") var outputFormat = "raw"
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp) var forceShare = false
    @Argument(help: "Operands: if=INPUT of=OUTPUT [bs=BYTES (512)] [count=BLOCKS] [skip=BLOCKS]; sizes take k, M, G, T suffixes.")
    var operands: [String] = []

    func run() throws {
        try imgRun {
            func fail(_ message: String) -> DiskImageError { DiskImageError(.invalidArgument, message) }
            var input: String?, output: String?, bs: UInt64 = 512, count: UInt64?, skip: UInt64?
            func number(_ key: String, _ value: String) throws -> UInt64 {
                guard let n = try? parseImgSize(value) else {
                    throw fail("Invalid \(key) specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
                }
                return n
            }
            for operand in operands {
                guard let eq = operand.firstIndex(of: "=") else { throw fail("unrecognized operand \(operand)") }
                let key = String(operand[..<eq]), value = String(operand[operand.index(after: eq)...])
                switch key {
                case "if": input = value
                case "of": output = value
                case "bs":
                    guard let n = try? parseImgSize(value), n >= 1, n <= UInt64(Int32.max) else {
                        throw fail("Invalid bs specified. Must be between 1 and \(Int32.max).")
                    }
                    bs = n
                case "count": count = try number("count", value)
                case "skip": skip = try number("skip", value)
                default: throw fail("unrecognized operand \(key)")
                }
            }
            guard let input, let output else { throw fail("Must specify both input and output files") }
            guard ["raw", "qcow2"].contains(outputFormat) else { throw fail("Unknown file format '\(outputFormat)' (raw or qcow2)") }
            let srcLocks = try lockImage(input, format: format, .read(forceShare: forceShare))
            defer { srcLocks.releaseAll() }
            let src = try openDiskImage(path: input, options: .init(readOnly: true, format: format))
            defer { try? src.close() }
            var size = src.size
            if let count {
                let (bytes, over) = count.multipliedReportingOverflow(by: bs)
                if !over && bytes <= size { size = bytes }
            }
            var start: UInt64 = 0
            var skipPastEnd = false
            if let skip {
                let (bytes, over) = skip.multipliedReportingOverflow(by: bs)
                if over || bytes > size {
                    skipPastEnd = true
                    size = 0
                } else {
                    start = bytes
                    size -= bytes
                }
            }
            try createImage(path: output, format: outputFormat, size: size, backing: nil, backingFormat: nil, options: [], sync: false)
            if skipPastEnd {
                writeText("swiftkvm img: \(input): cannot skip to specified offset\n", to: STDERR_FILENO)
                return
            }
            let dstLocks = try lockImage(output, format: outputFormat, .write, followBacking: false)
            defer { dstLocks.releaseAll() }
            let dst = try openDiskImage(path: output, options: .init(readOnly: false, format: outputFormat))
            // Every block is written, zeros too, as qemu-img dd does; large blocks go in 4 MiB pieces.
            let piece = Int(min(bs, 4 << 20))
            var buffer = [UInt8](repeating: 0, count: piece)
            var done: UInt64 = 0
            while done < size {
                let n = Int(min(UInt64(piece), size - done))
                try buffer.withUnsafeMutableBytes { b in
                    try src.read(into: UnsafeMutableRawBufferPointer(rebasing: b[..<n]), at: start + done)
                    try dst.write(UnsafeRawBufferPointer(rebasing: b[..<n]), at: done)
                }
                done += UInt64(n)
            }
            try dst.close()
        }
    }
}

/// `img measure`: the size a new image would need (qemu-img measure), for a size or for an existing image.
struct ImgMeasure: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "measure",
        abstract: "Show how large a new image would be: for --size N, or for converting FILE (qemu-img measure).")
    @Option(name: .customShort("O"), help: "The new image's format: raw (default) or qcow2.") var outputFormat = "raw"
    @Option(name: .customShort("o"), help: "The new image's options: qcow2 cluster_size, compat, refcount_bits, extended_l2, preallocation, backing_file, …") var options: [String] = []
    @Option(name: .customShort("f"), help: "FILE's format (probed when not given).") var format: String?
    @Option(name: .customLong("size"), parsing: .unconditional, help: "Measure an empty image of this size (k, M, G, T suffixes) instead of FILE.") var size: String?
    @Option(name: .customLong("output"), help: "human or json.") var output = "human"
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp) var forceShare = false
    @Argument(help: "The image to measure (for a conversion to -O).") var file: String?

    func run() throws {
        try imgRun {
            func fail(_ message: String) -> DiskImageError { DiskImageError(.invalidArgument, message) }
            switch (size, file) {
            case (nil, nil): throw fail("Either --size N or one filename must be specified.")
            case (_?, _?): throw fail("--size N cannot be used together with a filename.")
            default: break
            }
            guard ["raw", "qcow2"].contains(outputFormat) else { throw fail("Unknown file format '\(outputFormat)' (raw or qcow2)") }
            guard ["human", "json"].contains(output) else { throw fail("--output must be human or json, not '\(output)'") }
            let virtualSize: UInt64?
            do { virtualSize = try size.map(parseImgSize) } catch {
                throw fail("Invalid image size specified: '\(size ?? "")'. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            }
            if let v = virtualSize, v > UInt64(Int64.max) {
                throw fail("Invalid image size specified: '\(size ?? "")'. Image size must be less than 8 EiB!")
            }
            var source: BlockBackend?
            var locks: [ImageLock] = []
            defer {
                try? source?.close()
                locks.releaseAll()
            }
            if let file {
                locks = try lockImage(file, format: format, .read(forceShare: forceShare))
                source = try openDiskImage(path: file, options: .init(readOnly: true, format: format))
            }
            let m: ImageMeasurement
            if outputFormat == "raw" {
                var raw = options.flatMap { $0.split(separator: ",") }.map(String.init)
                raw.removeAll { $0.hasPrefix("preallocation=") }
                if let bad = raw.first { throw fail("Invalid parameter '\(bad)' for raw (known: preallocation)") }
                let bytes = source?.size ?? ImageMeasure.roundUp(virtualSize ?? 0, 512)
                m = ImageMeasurement(required: bytes, fullyAllocated: bytes)
            } else {
                // extended_l2 only changes the geometry here; the rest are create's options.
                var extendedL2 = false
                var createOptions: [String] = []
                for item in options.flatMap({ $0.split(separator: ",") }).map(String.init) {
                    if item == "extended_l2" || item.hasPrefix("extended_l2=") {
                        extendedL2 = ["extended_l2", "extended_l2=on", "extended_l2=true", "extended_l2=yes"].contains(item)
                    } else {
                        createOptions.append(item)
                    }
                }
                var o = Qcow2CreateOptions(size: virtualSize ?? source?.size ?? 0)
                var prealloc = "off"
                do { _ = try applyCreateOptions(createOptions, to: &o, preallocation: &prealloc) } catch let e as ValidationError {
                    throw fail(e.message)
                }
                guard o.clusterSize >= 512, o.clusterSize <= 2 << 20, o.clusterSize & (o.clusterSize - 1) == 0 else {
                    throw fail("Cluster size must be a power of two between 512 and 2048k")
                }
                guard o.refcountBits >= 1, o.refcountBits <= 64, o.refcountBits & (o.refcountBits - 1) == 0,
                      o.version >= 3 || o.refcountBits == 16 else {
                    throw fail("Refcount width must be a power of two and may not exceed 64 bits (16 with compat=0.10)")
                }
                if extendedL2 {
                    guard o.version >= 3 else { throw fail("Extended L2 entries are only supported with compatibility level 1.1 and above") }
                    guard o.clusterSize >= 16384 else { throw fail("Extended L2 entries are only supported with cluster sizes of at least 16 KiB") }
                }
                let layout = ImageMeasure.Qcow2Layout(clusterSize: o.clusterSize, refcountBits: UInt64(o.refcountBits), extendedL2: extendedL2)
                // qemu's limit: an L1 table of at most 32 MiB.
                let perL2 = o.clusterSize * (o.clusterSize / (extendedL2 ? 16 : 8))
                guard (o.size + perL2 - 1) / perL2 <= (32 << 20) / 8 else {
                    throw fail("The image size is too large (try using a larger cluster size)")
                }
                let everyCluster = o.backingFile != nil || o.preallocation == .falloc || o.preallocation == .full
                let data: UInt64? = try everyCluster ? nil : source.map { try ImageMeasure.dataClusterBytes(of: $0, clusterSize: o.clusterSize) } ?? 0
                var measured = ImageMeasure.qcow2(virtualSize: o.size, dataBytes: data, layout: layout)
                if o.version >= 3, let q = source as? Qcow2Image {
                    measured.bitmaps = try ImageMeasure.bitmapsSize(of: q, clusterSize: o.clusterSize)
                }
                m = measured
            }
            if output == "json" {
                var kv: [(String, ImgJSON)] = []
                if let b = m.bitmaps { kv.append(("bitmaps", .uint(b))) }
                kv += [("required", .uint(m.required)), ("fully-allocated", .uint(m.fullyAllocated))]
                print(ImgJSON.object(kv).render())
            } else {
                print("required size: \(m.required)")
                print("fully allocated size: \(m.fullyAllocated)")
                if let b = m.bitmaps { print("bitmaps size: \(b)") }
            }
        }
    }
}

struct ImgCompare: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "compare", abstract: "Compare the contents of two images. Exit 0 identical, 1 different, 2 error.")
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: forceShareHelp)
    var forceShare = false
    @Option(name: .customShort("f")) var format1: String?
    @Option(name: .customShort("F")) var format2: String?
    @Flag(name: .customShort("s"), help: "Strict: images of different sizes, or whose allocation differs, are different.")
    var strict = false
    @Argument var first: String
    @Argument var second: String

    func run() throws {
        do {
            let locks = try lockImage(first, format: format1, .read(forceShare: forceShare))
                + lockImage(second, format: format2, .read(forceShare: forceShare))
            defer { locks.releaseAll() }
            let a = try openDiskImage(path: first, options: .init(readOnly: true, format: format1))
            let b = try openDiskImage(path: second, options: .init(readOnly: true, format: format2))
            if strict, let m = try strictMismatch(a, b) {
                switch m {
                case .size: print("Strict mode: Image size mismatch!")
                case .status(let off): print("Strict mode: Offset \(off) block status mismatch!")
                }
                throw ExitCode(1)
            }
            if let off = try compareImages(a, b) {
                print("Content mismatch at offset \(off)!")
                throw ExitCode(1)
            }
            if a.size != b.size { print("Warning: Image size mismatch!") }
            print("Images are identical.")
        } catch let e as DiskImageError {
            writeText("swiftkvm img: \(e.message)\n", to: STDERR_FILENO)
            throw ExitCode(2)
        }
    }
}
