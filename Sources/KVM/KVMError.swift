@_exported import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// An error from a KVM ioctl or from setting up KVM objects: names the operation and the errno.
public struct KVMError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The ioctl or system call that failed, e.g. `"KVM_CREATE_VM"` or `"open /dev/kvm"`.
    public let operation: String
    /// The errno it failed with (0 when the failure is not an errno, see `detail`).
    public let errno: Int32
    /// Extra context (e.g. a value KVM returned that makes no sense).
    public let detail: String?

    /// Creates an error for `operation` failing with `errno`.
    public init(operation: String, errno: Int32, detail: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        var s = "\(operation) failed"
        if errno != 0 { s += ": \(String(cString: strerror(errno))) (errno \(errno))" }
        if let detail { s += ": \(detail)" }
        return s
    }
}

/// Issues one ioctl with an integer argument, retrying EINTR. Returns the non-negative result.
@discardableResult
func ioctlValue(_ fd: Int32, _ request: UInt, _ arg: UInt = 0, _ name: String) throws -> Int32 {
    while true {
        let r = ckvm_ioctl_value(fd, request, arg)
        if r >= 0 { return r }
        if r == -EINTR { continue }
        throw KVMError(operation: name, errno: -r)
    }
}

/// Issues one ioctl with a pointer argument, retrying EINTR. Returns the non-negative result.
@discardableResult
func ioctlPointer(_ fd: Int32, _ request: UInt, _ arg: UnsafeMutableRawPointer?, _ name: String) throws -> Int32 {
    while true {
        let r = ckvm_ioctl_ptr(fd, request, arg)
        if r >= 0 { return r }
        if r == -EINTR { continue }
        throw KVMError(operation: name, errno: -r)
    }
}

/// Issues an ioctl on a C struct passed by pointer (in, out or both), retrying EINTR.
@discardableResult
func ioctlStruct<T>(_ fd: Int32, _ request: UInt, _ value: inout T, _ name: String) throws -> Int32 {
    // SAFETY: `value` is a C-imported KVM struct whose layout matches what the ioctl expects;
    // the pointer is only used for the duration of the call.
    try withUnsafeMutablePointer(to: &value) { try ioctlPointer(fd, request, UnsafeMutableRawPointer($0), name) }
}
