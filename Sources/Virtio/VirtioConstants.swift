/// Virtio device types (virtio 1.x, section 5).
public enum VirtioDeviceType: UInt16, Sendable, CaseIterable {
    case net = 1
    case block = 2
    case console = 3
    case entropy = 4
    case balloon = 5
    case scsi = 8
    case vsock = 19
}

/// Feature bits shared by every device type (virtio 1.x, section 6).
public enum VirtioFeature {
    /// Indirect descriptors (VIRTIO_F_INDIRECT_DESC / VIRTIO_RING_F_INDIRECT_DESC).
    public static let ringIndirectDesc: UInt64 = 1 << 28
    /// used_event / avail_event notification suppression (VIRTIO_RING_F_EVENT_IDX).
    public static let ringEventIdx: UInt64 = 1 << 29
    /// Modern (virtio 1.x) device (VIRTIO_F_VERSION_1); required by this transport.
    public static let version1: UInt64 = 1 << 32
    /// Features every device here offers in addition to its own.
    public static let common: UInt64 = ringIndirectDesc | ringEventIdx | version1
}

/// Device status bits (virtio 1.x, section 2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt8 = 1
    public static let driver: UInt8 = 2
    public static let driverOK: UInt8 = 4
    public static let featuresOK: UInt8 = 8
    public static let deviceNeedsReset: UInt8 = 0x40
    public static let failed: UInt8 = 0x80
}

/// Descriptor and ring flags of the split virtqueue.
public enum VirtqFlags {
    /// The descriptor continues via `next`.
    public static let next: UInt16 = 1
    /// The buffer is device-writable.
    public static let write: UInt16 = 2
    /// The buffer holds an indirect descriptor table.
    public static let indirect: UInt16 = 4
    /// avail.flags: the driver does not want interrupts (ignored when EVENT_IDX was negotiated).
    public static let availNoInterrupt: UInt16 = 1
    /// used.flags: the device does not want notifications.
    public static let usedNoNotify: UInt16 = 1
}

/// `VIRTIO_MSI_NO_VECTOR`: no MSI-X vector is assigned.
public let virtioMSINoVector: UInt16 = 0xffff
