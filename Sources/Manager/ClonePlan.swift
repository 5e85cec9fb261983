import API
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VMM

/// What `swiftkvm vm clone SOURCE NEW` derives from the source VM's definition, before anything is
/// touched:
/// - the clone's definition: the new name, autostart off, its own copies of the writable disks
///   (`DIR/STEM-NEW.EXT` beside each image; read-only disks are shared), its own vsock socket
///   (`STEM-NEW.EXT` beside the source's), and NICs on the same networks with MACs derived from the
///   new name (explicit `mac` keys are dropped);
/// - how the snapshot's machine configuration changes for the clone's first run: disk paths, TAPs,
///   vsock socket and name. The NICs keep the MAC the running guest already uses (a guest reads its
///   MAC when the driver probes, so a changed device MAC would only break its receive filter); the
///   new MACs apply from the clone's next boot.
///
/// Refused (a clear error, nothing done): NICs in `network-interfaces` (host TAPs the user made,
/// which a second VM cannot share), drives without a host path (vhost-user sockets), and target
/// files that already exist.
struct ClonePlan: Sendable {
    /// A file the clone gets its own copy of.
    struct Copy: Sendable, Equatable {
        var from: String
        var to: String
    }

    let source: VMDefinition
    let clone: VMDefinition
    /// The writable disks to copy, in drive order.
    let diskCopies: [Copy]
    /// The source's TAP names → the clone's.
    let taps: [String: String]
    /// The vsock socket path change.
    let vsock: Copy?

    /// Derives the plan; `exists` says whether a path is taken (injected by tests).
    static func make(source: VMDefinition, newName: String,
                     exists: (String) -> Bool = { access($0, F_OK) == 0 }) throws(ManagerError) -> ClonePlan {
        guard VMDefinition.isValidName(newName) else {
            throw ManagerError(.invalid, "'\(newName)' is not a valid VM name (1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
        }
        guard newName != source.name else { throw ManagerError(.invalid, "a clone needs a name other than its source's ('\(newName)')") }
        let who = "vm '\(source.name)'"
        if let n = source.config.networkInterfaces.first {
            throw ManagerError(.invalid, "\(who) cannot be cloned: its network interface '\(n.ifaceId)' uses the host TAP \(n.hostDevName), which a second VM cannot share; attach it with `nics` (the manager's TAPs) instead")
        }
        var config = source.config
        var copies: [Copy] = []
        for (i, d) in config.drives.enumerated() {
            guard let path = d.pathOnHost else {
                throw ManagerError(.invalid, "\(who) cannot be cloned: drive '\(d.driveId)' has no host file (a vhost-user socket cannot be copied)")
            }
            if d.isReadOnly == true { continue }
            let target = Self.siblingPath(path, suffix: newName)
            guard !exists(target) else {
                throw ManagerError(.conflict, "the clone's copy of drive '\(d.driveId)' would be \(target), which already exists")
            }
            guard !copies.contains(where: { $0.to == target }) else {
                throw ManagerError(.invalid, "\(who) cannot be cloned: two of its drives would be copied to \(target)")
            }
            copies.append(Copy(from: path, to: target))
            config.drives[i].pathOnHost = target
        }
        var vsock: Copy?
        if let v = config.vsock {
            let target = Self.siblingPath(v.udsPath, suffix: newName)
            guard !exists(target) else {
                throw ManagerError(.conflict, "the clone's vsock socket would be \(target), which already exists")
            }
            vsock = Copy(from: v.udsPath, to: target)
            config.vsock?.udsPath = target
        }
        var taps: [String: String] = [:]
        var nics = source.nics
        for i in nics.indices {
            nics[i].mac = nil
            taps[VMNIC.tapName(vmName: source.name, index: i)] = VMNIC.tapName(vmName: newName, index: i)
        }
        let clone = VMDefinition(name: newName, autostart: false, shutdownTimeout: source.shutdownTimeout, config: config, nics: nics)
        return ClonePlan(source: source, clone: clone, diskCopies: copies, taps: taps, vsock: vsock)
    }

    /// `DIR/STEM-SUFFIX.EXT` for `DIR/STEM.EXT` (`DIR/NAME-SUFFIX` without an extension).
    static func siblingPath(_ path: String, suffix: String) -> String {
        let slash = path.lastIndex(of: "/").map { path.index(after: $0) } ?? path.startIndex
        let file = path[slash...]
        if let dot = file.lastIndex(of: "."), dot != file.startIndex {
            return String(path[..<dot]) + "-" + suffix + String(path[dot...])
        }
        return path + "-" + suffix
    }

    /// The snapshot's machine, changed for the clone: the copied disks, the clone's TAPs and vsock
    /// socket, its name; each NIC keeps the MAC its guest uses. Throws if the snapshot does not match
    /// the definition (a disk or TAP the plan does not know).
    func rewrite(_ machine: inout VMConfiguration) throws(ManagerError) {
        let diskMap = Dictionary(diskCopies.map { ($0.from, $0.to) }, uniquingKeysWith: { a, _ in a })
        for i in machine.disks.indices {
            if let to = diskMap[machine.disks[i].path] {
                machine.disks[i].path = to
            } else if !machine.disks[i].readOnly {
                throw ManagerError(.host, "the snapshot of vm '\(source.name)' has a writable disk \(machine.disks[i].path) that its definition does not list")
            }
        }
        for i in machine.nets.indices {
            machine.nets[i].mac = machine.nicMAC(i) // before the name changes: the guest's MAC
            guard case .tap(let tap) = machine.nets[i].backend else { continue }
            guard let to = taps[tap] else {
                throw ManagerError(.host, "the snapshot of vm '\(source.name)' has a NIC on TAP \(tap) that its definition does not list")
            }
            machine.nets[i].backend = .tap(name: to)
        }
        if let vsock, machine.vsock != nil { machine.vsock?.udsPath = vsock.to }
        machine.name = clone.name
    }
}
