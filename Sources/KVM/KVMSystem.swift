import CKVM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An open `/dev/kvm`: system-wide queries and VM creation.
public final class KVMSystem: @unchecked Sendable {
    /// The `/dev/kvm` file descriptor, owned by this object.
    public let fd: Int32

    /// The KVM API version every SwiftKVM feature assumes.
    public static let expectedAPIVersion: Int32 = 12

    /// Opens `path` (default `/dev/kvm`) read-write and checks the API version is 12.
    public init(path: String = "/dev/kvm") throws {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw KVMError(operation: "open \(path)", errno: errno) }
        self.fd = fd
        let version = try apiVersion()
        guard version == Self.expectedAPIVersion else {
            throw KVMError(operation: "KVM_GET_API_VERSION", errno: 0,
                           detail: "\(path) reports API version \(version), expected \(Self.expectedAPIVersion)")
        }
    }

    deinit { close(fd) }

    /// `KVM_GET_API_VERSION` (12 on every supported kernel).
    public func apiVersion() throws -> Int32 {
        try ioctlValue(fd, CKVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    }

    /// `KVM_CHECK_EXTENSION`: 0 when unsupported, otherwise 1 or a capability-specific value.
    public func checkExtension(_ cap: Capability) throws -> Int32 {
        try ioctlValue(fd, CKVM_CHECK_EXTENSION, UInt(cap.rawValue), "KVM_CHECK_EXTENSION(\(cap))")
    }

    /// `KVM_CHECK_EXTENSION` for a capability given by its number (`KVM_CAP_*`), e.g. from a CPU template.
    public func checkExtension(number: UInt32) throws -> Int32 {
        try ioctlValue(fd, CKVM_CHECK_EXTENSION, UInt(number), "KVM_CHECK_EXTENSION(\(number))")
    }

    /// Size of the per-vCPU `kvm_run` mapping (`KVM_GET_VCPU_MMAP_SIZE`).
    public func vcpuMmapSize() throws -> Int {
        Int(try ioctlValue(fd, CKVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"))
    }

    /// The answer of the first `supportedCPUID()` (it does not change while /dev/kvm is open, and
    /// on a PVM host each call emulates dozens of host CPUIDs: ~0.4 ms).
    private let supportedCPUIDCache = Mutex<[kvm_cpuid_entry2]?>(nil)

    /// The CPUID entries KVM can expose (`KVM_GET_SUPPORTED_CPUID`); the buffer grows on E2BIG.
    /// Asked once per `KVMSystem`.
    public func supportedCPUID() throws -> [kvm_cpuid_entry2] {
        if let cached = supportedCPUIDCache.withLock({ $0 }) { return cached }
        let entries = try querySupportedCPUID()
        supportedCPUIDCache.withLock { $0 = entries }
        return entries
    }

    private func querySupportedCPUID() throws -> [kvm_cpuid_entry2] {
        var capacity: UInt32 = 128
        while true {
            guard let buf = ckvm_cpuid2_alloc(capacity) else {
                throw KVMError(operation: "KVM_GET_SUPPORTED_CPUID", errno: ENOMEM)
            }
            defer { free(buf) }
            let r = ckvm_ioctl_ptr(fd, CKVM_GET_SUPPORTED_CPUID, buf)
            if r == -E2BIG && capacity < 8192 { capacity *= 2; continue }
            if r == -EINTR { continue }
            if r < 0 { throw KVMError(operation: "KVM_GET_SUPPORTED_CPUID", errno: -r) }
            // SAFETY: the kernel wrote `nent` (≤ capacity) entries into the flexible array that
            // ckvm_cpuid2_alloc sized for `capacity` entries.
            let n = Int(min(buf.pointee.nent, capacity))
            let entries = UnsafeMutableRawPointer(buf).advanced(by: MemoryLayout<kvm_cpuid2>.size)
                .assumingMemoryBound(to: kvm_cpuid_entry2.self)
            return Array(UnsafeBufferPointer(start: entries, count: n))
        }
    }

    /// The MSR indices KVM saves and restores (`KVM_GET_MSR_INDEX_LIST`).
    public func msrIndexList() throws -> [UInt32] {
        var capacity: UInt32 = 256
        while true {
            guard let list = ckvm_msr_list_alloc(capacity) else {
                throw KVMError(operation: "KVM_GET_MSR_INDEX_LIST", errno: ENOMEM)
            }
            defer { free(list) }
            let r = ckvm_ioctl_ptr(fd, CKVM_GET_MSR_INDEX_LIST, list)
            if r == -E2BIG && capacity < 16384 { capacity *= 4; continue }
            if r == -EINTR { continue }
            if r < 0 { throw KVMError(operation: "KVM_GET_MSR_INDEX_LIST", errno: -r) }
            // SAFETY: the kernel wrote `nmsrs` (≤ capacity) indices after the header.
            let n = Int(min(list.pointee.nmsrs, capacity))
            let indices = UnsafeMutableRawPointer(list).advanced(by: MemoryLayout<kvm_msr_list>.size)
                .assumingMemoryBound(to: UInt32.self)
            return Array(UnsafeBufferPointer(start: indices, count: n))
        }
    }

    /// Creates a VM (`KVM_CREATE_VM`, machine type 0).
    public func createVM() throws -> VirtualMachine {
        let vmfd = try ioctlValue(fd, CKVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return VirtualMachine(fd: vmfd, runMmapSize: try vcpuMmapSize())
    }
}
