import KVM

/// A custom CPU template (Firecracker's `PUT /cpu-config` on x86): bit modifiers for CPUID registers and MSRs,
/// applied to every vCPU after the VMM's own CPUID filter and MSR set-up.
///
/// A modifier is Firecracker's bitmap, `0b` then up to 32 (CPUID) or 64 (MSR) characters `0`, `1` or `x`, most
/// significant first and right-aligned (`_` may separate groups): a `0` clears its bit, a `1` sets it, an `x` (and every bit left of a
/// shorter bitmap) keeps the VMM's value.
public struct CPUTemplate: Codable, Sendable, Equatable {
    /// Bits to set and to clear in a value.
    public struct Bits: Codable, Sendable, Equatable {
        public var set: UInt64
        public var clear: UInt64
        public init(set: UInt64, clear: UInt64) { self.set = set; self.clear = clear }

        /// `value` with the bits changed.
        public func apply(_ value: UInt64) -> UInt64 { (value & ~clear) | set }

        /// Parses a bitmap of at most `width` bits; throws naming `what` and the problem.
        public init(bitmap: String, width: Int, what: String) throws {
            func bad(_ why: String) -> VMMError { .invalidValue(what: what, value: bitmap, reason: why) }
            guard bitmap.hasPrefix("0b") else { throw bad("a bitmap starts with 0b") }
            let body = bitmap.dropFirst(2).filter { $0 != "_" }   // '_' separates groups, as in Firecracker's templates
            guard !body.isEmpty, body.count <= width else { throw bad("a bitmap has 1 to \(width) digits") }
            var set: UInt64 = 0, clear: UInt64 = 0
            for (i, ch) in body.reversed().enumerated() {
                switch ch {
                case "1": set |= 1 << UInt64(i)
                case "0": clear |= 1 << UInt64(i)
                case "x", "X": break
                default: throw bad("'\(ch)' is not 0, 1 or x")
                }
            }
            self.set = set
            self.clear = clear
        }
    }

    /// One CPUID register's modifier.
    public struct CPUIDModifier: Codable, Sendable, Equatable {
        public var leaf: UInt32
        public var subleaf: UInt32
        public var register: CPUIDMask.Register
        public var bits: Bits
        public init(leaf: UInt32, subleaf: UInt32, register: CPUIDMask.Register, bits: Bits) {
            self.leaf = leaf; self.subleaf = subleaf; self.register = register; self.bits = bits
        }
    }

    /// One MSR's modifier.
    public struct MSRModifier: Codable, Sendable, Equatable {
        public var address: UInt32
        public var bits: Bits
        public init(address: UInt32, bits: Bits) { self.address = address; self.bits = bits }
    }

    public var cpuid: [CPUIDModifier]
    public var msrs: [MSRModifier]
    /// KVM capabilities (`KVM_CAP_*` numbers) the host must have for the template.
    public var requiredCapabilities: [UInt32]

    public init(cpuid: [CPUIDModifier] = [], msrs: [MSRModifier] = [], requiredCapabilities: [UInt32] = []) {
        self.cpuid = cpuid; self.msrs = msrs; self.requiredCapabilities = requiredCapabilities
    }

    /// Checks that `kvm` has every required capability; the error names the first it lacks.
    public func checkCapabilities(_ kvm: KVMSystem) throws {
        for cap in requiredCapabilities where ((try? kvm.checkExtension(number: cap)) ?? 0) <= 0 {
            throw VMMError.invalidConfiguration("cpu-config: this host's KVM lacks capability \(cap) (kvm_capabilities)")
        }
    }

    /// Applies the CPUID modifiers to a vCPU's table; a leaf/subleaf the table lacks is an error naming it.
    public func apply(to entries: inout [kvm_cpuid_entry2]) throws {
        for m in cpuid {
            guard let i = entries.firstIndex(where: { $0.function == m.leaf && $0.index == m.subleaf }) else {
                throw VMMError.invalidConfiguration(
                    "cpu-config: CPUID leaf 0x\(String(m.leaf, radix: 16)) subleaf 0x\(String(m.subleaf, radix: 16)) is not in the vCPU's CPUID (KVM does not offer it)")
            }
            func change(_ v: UInt32) -> UInt32 { UInt32(truncatingIfNeeded: m.bits.apply(UInt64(v))) }
            switch m.register {
            case .eax: entries[i].eax = change(entries[i].eax)
            case .ebx: entries[i].ebx = change(entries[i].ebx)
            case .ecx: entries[i].ecx = change(entries[i].ecx)
            case .edx: entries[i].edx = change(entries[i].edx)
            }
        }
    }

    /// Applies the MSR modifiers to `vcpu` (each MSR read, changed, written); an MSR KVM refuses is an error naming it.
    public func applyMSRs(to vcpu: VCPU) throws {
        for m in msrs {
            let what = "cpu-config: MSR 0x\(String(m.address, radix: 16))"
            let current: UInt64
            do {
                guard let v = try vcpu.getMSRs([m.address]).first?.value else { throw VMMError.invalidConfiguration("\(what) cannot be read") }
                current = v
            } catch let e as VMMError { throw e } catch {
                throw VMMError.invalidConfiguration("\(what) cannot be read: \(error)")
            }
            do { try vcpu.setMSRs([(m.address, m.bits.apply(current))]) } catch {
                throw VMMError.invalidConfiguration("\(what) cannot be set to 0x\(String(m.bits.apply(current), radix: 16)): \(error)")
            }
        }
    }
}
