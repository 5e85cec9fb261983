import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// One MSR filter range for `VirtualMachine.setMSRFilter`.
public struct MSRFilterRange: Sendable, Equatable {
    /// `KVM_MSR_FILTER_READ` and/or `KVM_MSR_FILTER_WRITE`.
    public var flags: UInt32
    /// First MSR index covered.
    public var base: UInt32
    /// Number of MSRs covered (bits of `bitmap` used).
    public var count: UInt32
    /// One bit per MSR: 1 allows the operations in `flags`, 0 denies (exits to user space).
    public var bitmap: [UInt8]

    /// A range; `bitmap` must hold at least `(count + 7) / 8` bytes.
    public init(flags: UInt32, base: UInt32, count: UInt32, bitmap: [UInt8]) {
        self.flags = flags; self.base = base; self.count = count; self.bitmap = bitmap
    }
}

/// A KVM virtual machine: owns its fd; creates vCPUs and configures VM-wide state.
public final class VirtualMachine: @unchecked Sendable {
    /// The VM file descriptor, owned by this object.
    public let fd: Int32
    let runMmapSize: Int

    init(fd: Int32, runMmapSize: Int) {
        self.fd = fd
        self.runMmapSize = runMmapSize
    }

    deinit { close(fd) }

    /// `KVM_CHECK_EXTENSION` on the VM fd (some answers are per VM).
    public func checkExtension(_ cap: Capability) throws -> Int32 {
        try ioctlValue(fd, CKVM_CHECK_EXTENSION, UInt(cap.rawValue), "KVM_CHECK_EXTENSION(\(cap)) on VM")
    }

    /// Maps `size` bytes of host memory at `host` into guest-physical `guestPhys` as memory slot `slot`
    /// (`KVM_SET_USER_MEMORY_REGION`). The host memory must outlive the VM (or the slot).
    public func setUserMemoryRegion(slot: UInt32, guestPhys: UInt64, size: UInt64,
                                    host: UnsafeMutableRawPointer, flags: UInt32 = 0) throws {
        var region = kvm_userspace_memory_region(slot: slot, flags: flags, guest_phys_addr: guestPhys,
                                                 memory_size: size, userspace_addr: UInt64(UInt(bitPattern: host)))
        try ioctlStruct(fd, CKVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION(slot \(slot), gpa 0x\(String(guestPhys, radix: 16)))")
    }

    /// Flag of `setUserMemoryRegion`: KVM logs the pages the guest writes (`getDirtyLog`).
    public static let logDirtyPages = UInt32(CKVM_MEM_LOG_DIRTY_PAGES)

    /// `KVM_GET_DIRTY_LOG`: the pages of memory slot `slot` (of `size` bytes, registered with
    /// `logDirtyPages`) the guest wrote since the last call, one bit per 4 KiB page (bit `i % 64` of
    /// word `i / 64`); KVM clears the log as it returns it.
    public func getDirtyLog(slot: UInt32, size: UInt64) throws -> [UInt64] {
        let pages = Int((size + 4095) / 4096)
        var bitmap = [UInt64](repeating: 0, count: (pages + 63) / 64)
        try bitmap.withUnsafeMutableBytes { buf in
            var log = kvm_dirty_log()
            log.slot = slot
            log.dirty_bitmap = buf.baseAddress
            _ = try ioctlStruct(fd, CKVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG(slot \(slot))")
        }
        return bitmap
    }

    /// `KVM_SET_TSS_ADDR`: three pages KVM needs below 4 GiB on Intel hosts.
    public func setTSSAddress(_ address: UInt64) throws {
        try ioctlValue(fd, CKVM_SET_TSS_ADDR, UInt(address), "KVM_SET_TSS_ADDR")
    }

    /// `KVM_SET_IDENTITY_MAP_ADDR`: one page for the real-mode identity map on Intel hosts.
    public func setIdentityMapAddress(_ address: UInt64) throws {
        var a = address
        try ioctlStruct(fd, CKVM_SET_IDENTITY_MAP_ADDR, &a, "KVM_SET_IDENTITY_MAP_ADDR")
    }

    /// `KVM_CREATE_IRQCHIP`: in-kernel PIC, IOAPIC and local APICs.
    public func createIRQChip() throws {
        try ioctlValue(fd, CKVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
    }

    /// `KVM_CREATE_PIT2`: in-kernel i8254 PIT.
    public func createPIT2() throws {
        var config = kvm_pit_config()
        try ioctlStruct(fd, CKVM_CREATE_PIT2, &config, "KVM_CREATE_PIT2")
    }

    /// `KVM_IRQ_LINE`: sets the level of GSI `irq` on the in-kernel interrupt controllers.
    public func setIRQLine(_ irq: UInt32, level: Bool) throws {
        var line = kvm_irq_level()
        line.irq = irq
        line.level = level ? 1 : 0
        try ioctlStruct(fd, CKVM_IRQ_LINE, &line, "KVM_IRQ_LINE(\(irq))")
    }

    /// `KVM_ENABLE_CAP` on the VM with `args[0...]`.
    public func enableCap(_ cap: Capability, args: [UInt64] = []) throws {
        var c = kvm_enable_cap()
        c.cap = UInt32(cap.rawValue)
        withUnsafeMutableBytes(of: &c.args) { raw in
            let words = raw.bindMemory(to: UInt64.self)
            for (i, a) in args.prefix(words.count).enumerated() { words[i] = a }
        }
        try ioctlStruct(fd, CKVM_ENABLE_CAP, &c, "KVM_ENABLE_CAP(\(cap))")
    }

    /// `KVM_X86_SET_MSR_FILTER` with up to 16 ranges.
    /// - Parameter defaultDeny: deny (exit on) MSRs outside every range.
    public func setMSRFilter(defaultDeny: Bool, ranges: [MSRFilterRange]) throws {
        guard ranges.count <= Int(KVM_MSR_FILTER_MAX_RANGES) else {
            throw KVMError(operation: "KVM_X86_SET_MSR_FILTER", errno: EINVAL, detail: "\(ranges.count) ranges, at most 16")
        }
        for r in ranges where r.bitmap.count < Int((r.count + 7) / 8) {
            throw KVMError(operation: "KVM_X86_SET_MSR_FILTER", errno: EINVAL,
                           detail: "bitmap of range at MSR 0x\(String(r.base, radix: 16)) is \(r.bitmap.count) bytes for \(r.count) MSRs")
        }
        // Copy every bitmap into one allocation that stays valid during the ioctl.
        let total = ranges.reduce(0) { $0 + $1.bitmap.count }
        let storage = UnsafeMutableRawPointer.allocate(byteCount: max(total, 1), alignment: 8)
        defer { storage.deallocate() }
        var filter = kvm_msr_filter()
        filter.flags = defaultDeny ? UInt32(KVM_MSR_FILTER_DEFAULT_DENY) : UInt32(KVM_MSR_FILTER_DEFAULT_ALLOW)
        var offset = 0
        withUnsafeMutableBytes(of: &filter.ranges) { raw in
            // SAFETY: `ranges` is a tuple of 16 kvm_msr_filter_range, laid out as a C array.
            let slots = raw.bindMemory(to: kvm_msr_filter_range.self)
            for (i, r) in ranges.enumerated() {
                let p = (storage + offset).assumingMemoryBound(to: UInt8.self)
                r.bitmap.withUnsafeBufferPointer { p.update(from: $0.baseAddress!, count: r.bitmap.count) }
                slots[i] = kvm_msr_filter_range(flags: r.flags, nmsrs: r.count, base: r.base, bitmap: p)
                offset += r.bitmap.count
            }
        }
        try ioctlStruct(fd, CKVM_X86_SET_MSR_FILTER, &filter, "KVM_X86_SET_MSR_FILTER")
    }

    /// Creates vCPU `id` (`KVM_CREATE_VCPU`) and maps its `kvm_run`.
    public func createVCPU(id: UInt32) throws -> VCPU {
        let vcpufd = try ioctlValue(fd, CKVM_CREATE_VCPU, UInt(id), "KVM_CREATE_VCPU(\(id))")
        do {
            return try VCPU(fd: vcpufd, id: id, mmapSize: runMmapSize)
        } catch {
            close(vcpufd)
            throw error
        }
    }
}
