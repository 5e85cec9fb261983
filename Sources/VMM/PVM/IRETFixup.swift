import Boot
import KVM
import Logging
import GuestMemory

/// `iret` in 32- or 16-bit protected mode, which KVM's instruction emulator leaves unimplemented (it
/// emulates only the real-mode form) and which PVM hosts emulate for all guest ring-0 code: firmware
/// option ROMs such as iPXE return from their interrupt handlers with it.
///
/// Emulated: returns to the same privilege level and to an outer one (with ESP and SS from the
/// stack, and data segments the new level may not use made null), through GDT descriptors, with
/// the SDM's rules for which EFLAGS bits the old CPL may change. Not emulated (the failure is then
/// reported with its bytes): nested-task returns (NT), returns to virtual-8086 mode, LDT selectors,
/// long mode. A descriptor that fails the checks raises #GP(selector), a not-present one #NP or #SS, an EIP
/// beyond the CS limit #GP(0), as hardware does; the return ends NMI blocking.
enum IRETEmulation {
    /// What to do.
    enum Outcome: Equatable {
        /// Load these registers.
        case load(rip: UInt64, rsp: UInt64, rflags: UInt64, cs: Segment, ss: Segment?, nullDataSegments: [Bool])
        /// Raise #GP with this error code.
        case generalProtection(UInt32)
        /// Raise this fault (#NP 11, #SS 12) with this error code.
        case fault(vector: UInt8, code: UInt32)
        /// Not a form emulated here.
        case unsupported(String)

        /// Whether this is a valid return.
        var loads: Bool { if case .load = self { true } else { false } }
    }

    /// A segment as loaded (the loaders' type; `EntryConversion.segment` makes the KVM form).
    typealias Segment = EntryState.Segment

    /// Decodes an 8-byte GDT descriptor for `selector` (limit scaled by G; type with the accessed bit set; the L bit
    /// left clear, as it means nothing outside long mode).
    static func decode(_ d: [UInt8], selector: UInt16) -> Segment {
        var limit = UInt32(d[0]) | UInt32(d[1]) << 8 | UInt32(d[6] & 0xf) << 16
        let g = d[6] & 0x80 != 0
        if g { limit = limit << 12 | 0xfff }
        let base = UInt64(d[2]) | UInt64(d[3]) << 8 | UInt64(d[4]) << 16 | UInt64(d[7]) << 24
        return Segment(base: base, limit: limit, selector: selector, type: d[5] & 0xf | 1, present: d[5] & 0x80 != 0,
                       dpl: (d[5] >> 5) & 3, db: d[6] & 0x40 != 0, s: d[5] & 0x10 != 0, l: false, g: g)
    }

    /// The EFLAGS after `iret` pops `popped` at privilege `cpl` with the current `rflags`.
    static func flags(current rflags: UInt64, popped: UInt64, cpl: UInt8, operand32: Bool) -> UInt64 {
        let iopl = UInt8((rflags >> 12) & 3)
        // CF PF AF ZF SF TF DF OF NT, and with a 32-bit operand RF AC ID.
        var mask: UInt64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | 0x4000
        if operand32 { mask |= 1 << 16 | 1 << 18 | 1 << 21 }
        if cpl <= iopl { mask |= 0x200 }                           // IF
        if cpl == 0 {
            mask |= 0x3000                                        // IOPL
            if operand32 { mask |= 1 << 19 | 1 << 20 }            // VIF, VIP
        }
        return (rflags & ~mask) | (popped & mask) | 0x2
    }

    /// Decides the outcome. `stack` holds the bytes at SS:ESP (at least 5 words); `descriptor(sel)`
    /// returns a GDT descriptor's 8 bytes, or nil when the selector is outside the GDT.
    static func emulate(operand32: Bool, cpl: UInt8, rflags: UInt64, rsp: UInt64, stackIs32: Bool, stack: [UInt8],
                        dataSegments: [Segment], descriptor: (UInt16) -> [UInt8]?) -> Outcome {
        guard rflags & 0x4000 == 0 else { return .unsupported("a nested-task return (EFLAGS.NT)") }
        let w = operand32 ? 4 : 2
        guard stack.count >= 3 * w else { return .unsupported("the stack at SS:ESP is not readable") }
        func word(_ i: Int) -> UInt64 {
            (0..<w).reduce(UInt64(0)) { $0 | UInt64(stack[i * w + $1]) << (8 * UInt64($1)) }
        }
        let newIP = word(0), selector = UInt16(truncatingIfNeeded: word(1)), popped = word(2)
        if operand32, popped & (1 << 17) != 0, cpl == 0 { return .unsupported("a return to virtual-8086 mode") }
        let rpl = UInt8(selector & 3)
        let gp = Outcome.generalProtection(UInt32(selector & 0xfffc))
        guard selector & 0xfffc != 0 else { return .generalProtection(0) }
        guard selector & 4 == 0 else { return .unsupported("an LDT code selector 0x\(String(selector, radix: 16))") }
        guard rpl >= cpl, let d = descriptor(selector) else { return gp }
        let cs = decode(d, selector: selector)
        guard cs.s, cs.type & 8 != 0 else { return gp }                              // a code segment
        guard cs.type & 4 != 0 ? cs.dpl <= rpl : cs.dpl == rpl else { return gp }    // conforming or not
        guard cs.present else { return .fault(vector: 11, code: UInt32(selector & 0xfffc)) }   // #NP(selector)
        // Outside long mode the L bit means nothing. The new EIP (of the operand size) must lie within CS's limit.
        let eip = operand32 ? newIP & 0xffff_ffff : newIP & 0xffff
        guard eip <= UInt64(cs.limit) else { return .generalProtection(0) }
        let flags = flags(current: rflags, popped: popped, cpl: cpl, operand32: operand32)
        let frame = UInt64(3 * w)
        func advanced(_ n: UInt64) -> UInt64 {
            stackIs32 ? (rsp &+ n) & 0xffff_ffff : (rsp & ~0xffff) | ((rsp &+ n) & 0xffff)
        }
        if rpl == cpl {
            return .load(rip: eip, rsp: advanced(frame), rflags: flags, cs: cs, ss: nil,
                         nullDataSegments: Array(repeating: false, count: dataSegments.count))
        }
        // An outer level: ESP and SS from the stack too.
        guard stack.count >= 5 * w else { return .unsupported("the stack at SS:ESP is not readable") }
        let newSP = word(3), ssSelector = UInt16(truncatingIfNeeded: word(4))
        let ssGP = Outcome.generalProtection(UInt32(ssSelector & 0xfffc))
        guard ssSelector & 0xfffc != 0, ssSelector & 4 == 0, UInt8(ssSelector & 3) == rpl, let sd = descriptor(ssSelector) else { return ssGP }
        let ss = decode(sd, selector: ssSelector)
        guard ss.s, ss.type & 0xa == 0x2, ss.dpl == rpl else { return ssGP }          // a writable data segment
        guard ss.present else { return .fault(vector: 12, code: UInt32(ssSelector & 0xfffc)) }   // #SS(selector)
        // Data segments (and non-conforming code) more privileged than the new level become null.
        let nulls = dataSegments.map { s in s.present && s.selector & 0xfffc != 0 && (s.type & 8 == 0 || s.type & 4 == 0) && s.dpl < rpl }
        return .load(rip: eip, rsp: ss.db ? newSP & 0xffff_ffff : newSP & 0xffff, rflags: flags, cs: cs, ss: ss,
                     nullDataSegments: nulls)
    }
}

extension EntryState.Segment {
    /// The segment register's current state (an unusable one counts as not present).
    init(_ k: kvm_segment) {
        self.init(base: k.base, limit: k.limit, selector: k.selector, type: k.type, present: k.present != 0 && k.unusable == 0,
                  dpl: k.dpl, db: k.db != 0, s: k.s != 0, l: k.l != 0, g: k.g != 0)
    }
}

extension PVMQuirks {
    /// Emulates a protected-mode `iret` (`prefixed`: with an operand-size prefix) on `vcpu`; false
    /// when it is a form not emulated here (the caller reports the failure).
    func emulateIRET(vcpu: VCPU, memory: GuestMemory, sregs: kvm_sregs, prefixed: Bool, logger: Logger) throws -> Bool {
        guard sregs.cr0 & 1 != 0, sregs.efer & (1 << 10) == 0 else { return false }   // protected mode, not long mode
        var regs = try vcpu.getRegs()
        guard regs.rflags & (1 << 17) == 0 else { return false }                      // not from virtual-8086 mode
        func read(_ linear: UInt64, _ count: Int) -> [UInt8] {
            GuestPageWalker.read(linear, count: count, cr0: sregs.cr0, cr3: sregs.cr3, cr4: sregs.cr4, efer: sregs.efer, memory: memory)
        }
        let stackIs32 = sregs.ss.db != 0
        let sp = stackIs32 ? regs.rsp & 0xffff_ffff : regs.rsp & 0xffff
        let operand32 = (sregs.cs.db != 0) != prefixed
        let data = [sregs.ds, sregs.es, sregs.fs, sregs.gs].map(IRETEmulation.Segment.init)
        func decide(at linear: UInt64) -> IRETEmulation.Outcome {
            // Five words for a return to an outer level; three where the page ends before them.
            var stack = read(linear & 0xffff_ffff, 5 * (operand32 ? 4 : 2))
            if stack.isEmpty { stack = read(linear & 0xffff_ffff, 3 * (operand32 ? 4 : 2)) }
            return IRETEmulation.emulate(
                operand32: operand32, cpl: sregs.ss.dpl, rflags: regs.rflags, rsp: regs.rsp, stackIs32: stackIs32,
                stack: stack, dataSegments: data) { selector in
                    let offset = UInt64(selector & 0xfff8)
                    guard offset + 7 <= UInt64(sregs.gdt.limit) else { return nil }
                    let d = read(sregs.gdt.base &+ offset, 8)
                    return d.count == 8 ? d : nil
                }
        }
        var outcome = decide(at: sregs.ss.base &+ sp)
        // This host delivers interrupts and exceptions in protected mode with the frame pushed at the linear
        // address ESP, ignoring the SS base (measured with iPXE, whose stack segment is based at its load
        // address). Where the frame at SS:ESP is not a valid return, the host's is taken.
        if sregs.ss.base != 0, sregs.ss.dpl == 0, !outcome.loads, decide(at: sp).loads {
            outcome = decide(at: sp)
            count("iret frame without the SS base")
        }
        switch outcome {
        case .unsupported(let why):
            logger.error("pvm: iret at rip 0x\(String(regs.rip, radix: 16)) not emulated: \(why)")
            return false
        case .fault(let vector, let code):
            try vcpu.injectException(vector: vector, errorCode: code)
            count("iret → #\(vector == 11 ? "NP" : "SS")")
        case .generalProtection(let code):
            logger.debug("pvm: iret at rip 0x\(String(regs.rip, radix: 16)): #GP(0x\(String(code, radix: 16))); stack at SS:ESP \(read((sregs.ss.base &+ sp) & 0xffff_ffff, 12)), at ESP \(read(sp, 12)), rflags 0x\(String(regs.rflags, radix: 16))")
            try vcpu.injectException(vector: 13, errorCode: code)
            count("iret → #GP")
        case .load(let rip, let rsp, let rflags, let cs, let ss, let nulls):
            var s = sregs
            s.cs = EntryConversion.segment(cs)
            if let ss { s.ss = EntryConversion.segment(ss) }
            func null(_ seg: inout kvm_segment) { seg.selector = 0; seg.present = 0; seg.unusable = 1 }
            if nulls[0] { null(&s.ds) }
            if nulls[1] { null(&s.es) }
            if nulls[2] { null(&s.fs) }
            if nulls[3] { null(&s.gs) }
            regs.rip = cs.db ? rip & 0xffff_ffff : rip & 0xffff
            regs.rsp = rsp
            regs.rflags = rflags
            try vcpu.setSregs(s)
            try vcpu.setRegs(regs)
            // iret ends NMI blocking (KVM's real-mode iret does the same); a pending NMI stays pending.
            var events = try vcpu.getVCPUEvents()
            if events.nmi.masked != 0 {
                events.nmi.masked = 0
                events.flags = 0
                try vcpu.setVCPUEvents(events)
            }
            count("iret")
        }
        return true
    }
}
