// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "SwiftKVM",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "swiftkvm", targets: ["swiftkvm"]),
        .library(name: "DiskImage", targets: ["DiskImage"]),
        .library(name: "VMM", targets: ["VMM"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.65.0"),
    ],
    targets: [
        // C shim: <linux/kvm.h>, boot params, ioctl numbers and non-variadic wrappers.
        .target(name: "CKVM"),
        // Compression libraries from Debian's -dev packages.
        .systemLibrary(name: "CZlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CLZMA", providers: [.apt(["liblzma-dev"])]),
        .systemLibrary(name: "CLZ4", providers: [.apt(["liblz4-dev"])]),
        // seccomp-BPF filters for the VMM's threads (Debian's libseccomp-dev).
        .systemLibrary(name: "CSeccomp", providers: [.apt(["libseccomp-dev"])]),

        .target(name: "GuestMemory"),
        .target(name: "KVM", dependencies: ["CKVM"]),
        .target(name: "Boot", dependencies: ["GuestMemory", "CZlib", "CZstd", "CLZMA", "CLZ4"]),
        .target(name: "Devices", dependencies: ["GuestMemory", "CKVM", "CSeccomp"]),
        .target(name: "DiskImage", dependencies: ["CZlib", "CZstd"]),
        .target(name: "PCI", dependencies: ["Devices"]),
        .target(name: "CNet"),
        // The jailer (`swiftkvm jailer`): its system calls in a C shim, the logic in a library.
        .target(name: "CJail"),
        .target(name: "Jailer", dependencies: ["CJail"]),
        .target(name: "Net", dependencies: ["CNet"]),
        .target(name: "Virtio", dependencies: ["PCI", "Devices", "GuestMemory", "DiskImage", "Net"]),
        .target(name: "VMM", dependencies: [
            "KVM", "GuestMemory", "Boot", "Devices", "PCI", "Virtio", "DiskImage", "Net", "CZlib",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "API", dependencies: [
            "VMM", "Virtio", "Devices", "CKVM", "GuestMemory",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "Manager", dependencies: [
            "API", "VMM", "Devices", "DiskImage",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Test-only code: the crash writer's plan (shared with DiskImageTests) and a helper executable for
        // commands the tests need and users do not.
        .target(name: "SwiftKVMTestSupport"),
        .executableTarget(name: "swiftkvm-test-helper", dependencies: ["SwiftKVMTestSupport", "DiskImage", "VMM", "API", "Devices"]),
        .executableTarget(name: "swiftkvm", dependencies: [
            "VMM", "KVM", "Boot", "Devices", "GuestMemory", "DiskImage", "API", "Manager", "Jailer",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),

        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM", "CKVM"]),
        .testTarget(name: "BootTests", dependencies: ["Boot", "GuestMemory", "CKVM"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "GuestMemory"]),
        .testTarget(name: "DiskImageTests", dependencies: ["DiskImage", "SwiftKVMTestSupport"]),
        .testTarget(name: "PCITests", dependencies: ["PCI", "Devices"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "PCI", "Devices", "GuestMemory", "DiskImage", "Net"]),
        .testTarget(name: "VMMTests", dependencies: ["VMM"]),
        .testTarget(name: "APITests", dependencies: ["API", "VMM", "DiskImage", "SwiftKVMTestSupport"]),
        .testTarget(name: "JailerTests", dependencies: ["Jailer"]),
        .testTarget(name: "ManagerTests", dependencies: ["Manager", "API", "VMM", "SwiftKVMTestSupport"]),
        .testTarget(name: "IntegrationTests", dependencies: ["VMM", "KVM", "Boot", "Devices", "GuestMemory", "DiskImage"]),
    ]
)
