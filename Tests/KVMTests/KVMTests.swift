import CKVM
import Foundation
import Testing
@testable import KVM

/// Whether this machine has a usable /dev/kvm.
let hasKVM = FileManager.default.fileExists(atPath: "/dev/kvm")

@Suite("KVM bindings without /dev/kvm")
struct KVMErrorTests {
    @Test("KVMError names the ioctl and the errno text")
    func errorMessage() {
        let e = KVMError(operation: "KVM_CREATE_VM", errno: EINVAL)
        #expect(e.description.contains("KVM_CREATE_VM"))
        #expect(e.description.contains("Invalid argument"))
        #expect(e.description.contains("errno 22"))
    }

    @Test("a failing ioctl on a bad fd throws a KVMError naming it")
    func badFD() {
        #expect(throws: KVMError(operation: "KVM_GET_API_VERSION", errno: EBADF)) {
            try ioctlValue(-1, CKVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        }
    }

    @Test("opening a missing device fails with ENOENT and names the path")
    func missingDevice() {
        do {
            _ = try KVMSystem(path: "/nonexistent/kvm")
            Issue.record("opening a missing device succeeded")
        } catch let e as KVMError {
            #expect(e.errno == ENOENT)
            #expect(e.description.contains("/nonexistent/kvm"))
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test("capability numbers match <linux/kvm.h>")
    func capabilityNumbers() {
        #expect(Capability.irqchip.rawValue == 0)
        #expect(Capability.pit2.rawValue == 33)
        #expect(Capability.immediateExit.rawValue == 136)
        #expect(Capability.x86UserSpaceMSR.rawValue == 188)
        #expect(Set(Capability.allCases.map(\.rawValue)).count == Capability.allCases.count)
    }
}

/// A VM with 64 KiB of RAM at guest-physical 0 and one vCPU in real mode at 0:0x1000.
final class TinyRealModeVM {
    let system: KVMSystem
    let vm: VirtualMachine
    let vcpu: VCPU
    let memory: UnsafeMutableRawPointer
    static let size = 0x10000

    init(code: [UInt8]) throws {
        system = try KVMSystem()
        vm = try system.createVM()
        memory = UnsafeMutableRawPointer.allocate(byteCount: Self.size, alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: Self.size)
        for (i, b) in code.enumerated() { memory.storeBytes(of: b, toByteOffset: 0x1000 + i, as: UInt8.self) }
        try vm.setUserMemoryRegion(slot: 0, guestPhys: 0, size: UInt64(Self.size), host: memory)
        vcpu = try vm.createVCPU(id: 0)
        var s = try vcpu.getSregs()
        s.cs.base = 0; s.cs.selector = 0
        s.ds.base = 0; s.ds.selector = 0
        s.es.base = 0; s.es.selector = 0
        s.ss.base = 0; s.ss.selector = 0
        try vcpu.setSregs(s)
        var r = kvm_regs()
        r.rip = 0x1000
        r.rsp = 0x8000
        r.rflags = 2
        try vcpu.setRegs(r)
    }

    deinit { memory.deallocate() }
}

@Suite("KVM bindings on /dev/kvm", .enabled(if: hasKVM, "needs /dev/kvm"))
struct KVMDeviceTests {
    @Test("the API version is 12 and the core capabilities are present")
    func apiVersion() throws {
        let kvm = try KVMSystem()
        #expect(try kvm.apiVersion() == 12)
        #expect(try kvm.checkExtension(.userMemory) > 0)
        #expect(try kvm.checkExtension(.irqchip) > 0)
        #expect(try kvm.vcpuMmapSize() >= MemoryLayout<kvm_run>.size)
    }

    @Test("supported CPUID has leaf 0 and leaf 1, and the MSR list is non-empty")
    func cpuidAndMSRs() throws {
        let kvm = try KVMSystem()
        let cpuid = try kvm.supportedCPUID()
        #expect(cpuid.contains { $0.function == 0 })
        #expect(cpuid.contains { $0.function == 1 })
        #expect(try !kvm.msrIndexList().isEmpty)
    }

    @Test("a real-mode program's OUT and HLT come back as typed exits")
    func outAndHalt() throws {
        // mov al, 0x42 ; mov dx, 0x10 ; out dx, al ; in al, dx ; out dx, al ; hlt
        let vm = try TinyRealModeVM(code: [0xb0, 0x42, 0xba, 0x10, 0x00, 0xee, 0xec, 0xee, 0xf4])
        guard case .io(let port, let size, let dir, let count, let data) = try vm.vcpu.run() else {
            Issue.record("expected an I/O exit"); return
        }
        #expect(port == 0x10 && size == 1 && dir == .out && count == 1)
        #expect(data.load(as: UInt8.self) == 0x42)
        // The IN: answer 0x99, which the next OUT writes back.
        guard case .io(_, _, .in, _, let inData) = try vm.vcpu.run() else { Issue.record("expected IN"); return }
        inData.storeBytes(of: 0x99, as: UInt8.self)
        guard case .io(_, _, .out, _, let outData) = try vm.vcpu.run() else { Issue.record("expected OUT"); return }
        #expect(outData.load(as: UInt8.self) == 0x99)
        let exit = try vm.vcpu.run()
        guard case .halt = exit else { Issue.record("expected HLT, got \(exit.name)"); return }
        #expect(try vm.vcpu.getRegs().rip == 0x1009)
    }

    @Test("an access to unbacked guest memory is an MMIO exit with its address and data")
    func mmio() throws {
        // Memory is 64 KiB, so write through ES = 0x2000 (gpa 0x20000, unbacked):
        // mov bx, 0x2000 ; mov es, bx ; mov word es:[0x10], 0x1234 ; hlt
        let vm = try TinyRealModeVM(code: [0xbb, 0x00, 0x20, 0x8e, 0xc3, 0x26, 0xc7, 0x06, 0x10, 0x00, 0x34, 0x12, 0xf4])
        let exit = try vm.vcpu.run()
        guard case .mmio(let address, let data, let length, let isWrite) = exit else {
            Issue.record("expected MMIO, got \(exit.name)"); return
        }
        #expect(address == 0x20010 && length == 2 && isWrite)
        #expect(data.loadUnaligned(as: UInt16.self) == 0x1234)
    }

    @Test("immediate_exit makes KVM_RUN return interrupted")
    func immediateExit() throws {
        let vm = try TinyRealModeVM(code: [0xeb, 0xfe]) // jmp $
        vm.vcpu.immediateExit = true
        #expect(vm.vcpu.immediateExit)
        guard case .interrupted = try vm.vcpu.run() else { Issue.record("expected interrupted"); return }
        vm.vcpu.immediateExit = false
        #expect(!vm.vcpu.immediateExit)
    }

    @Test("an MSR filter sends a denied WRMSR to user space as a typed exit")
    func msrFilter() throws {
        // mov ecx, 0xc0000082 ; mov eax, 0x1234 ; xor edx, edx ; wrmsr ; hlt
        let vm = try TinyRealModeVM(code: [0x66, 0xb9, 0x82, 0x00, 0x00, 0xc0, 0x66, 0xb8, 0x34, 0x12, 0x00, 0x00,
                                           0x66, 0x31, 0xd2, 0x0f, 0x30, 0xf4])
        try vm.vm.enableCap(.x86UserSpaceMSR, args: [UInt64(KVM_MSR_EXIT_REASON_FILTER)])
        try vm.vm.setMSRFilter(defaultDeny: false, ranges: [
            MSRFilterRange(flags: UInt32(KVM_MSR_FILTER_WRITE), base: 0xc000_0082, count: 1, bitmap: [0]),
        ])
        let exit = try vm.vcpu.run()
        guard case .x86WRMSR(let index, let value, _) = exit else { Issue.record("expected WRMSR, got \(exit.name)"); return }
        #expect(index == 0xc000_0082 && value == 0x1234)
        vm.vcpu.completeMSR()
        guard case .halt = try vm.vcpu.run() else { Issue.record("expected HLT after the WRMSR"); return }
        #expect(throws: KVMError.self) {
            try vm.vm.setMSRFilter(defaultDeny: false, ranges: [MSRFilterRange(flags: 2, base: 0, count: 64, bitmap: [0])])
        }
    }

    @Test("MSRs set on a vCPU read back, and CPUID entries can be set")
    func msrsAndCPUID() throws {
        let vm = try TinyRealModeVM(code: [0xf4])
        try vm.vcpu.setCPUID(try vm.system.supportedCPUID())
        try vm.vcpu.setMSRs([(0x174, 0x10)]) // IA32_SYSENTER_CS
        let back = try vm.vcpu.getMSRs([0x174])
        #expect(back.first?.value == 0x10)
        #expect(try vm.vcpu.getCPUID().contains { $0.function == 1 })
    }
}
