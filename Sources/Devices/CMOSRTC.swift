#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The MC146818-style CMOS real-time clock and its 128 bytes of CMOS memory (ports 0x70-0x71).
///
/// Insert it at `CMOSRTC.defaultBase` with `portCount` (2) ports: offset 0 (0x70) selects a
/// register (bit 7 is the NMI-disable bit, recorded but masked off the index; reads of 0x70
/// return 0xff), offset 1 (0x71) reads or writes the selected register.
///
/// Time registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week with Sunday = 1,
/// 0x07 day of month, 0x08 month, 0x09 year, 0x32 century) follow the injected clock (UTC),
/// in BCD or binary per register B bit 2 (DM) and in 24-hour or 12-hour form (bit 7 = PM) per
/// register B bit 1. While register B bit 7 (SET) is set the time registers hold what the guest
/// writes (and UIE is cleared); clearing SET makes that the clock's new time (kept as a whole-second
/// offset from the host clock). Register D reads 0x80 (valid RAM and time). Other bytes are plain
/// memory; `setMemorySize` fills the memory-size bytes the way QEMU and SeaBIOS do.
///
/// The update cycle and interrupts, as the datasheet describes them:
/// - register A's UIP (bit 7) reads 1 from 244 µs before each second boundary of the clock until
///   the update cycle ends 1984 µs after it, unless SET is set or the divider is held in reset
///   (register A bits 6-5 both set); the time registers take the new second as the update ends, so a
///   read after UIP falls always sees it;
/// - register C's flags: UF (bit 4) when an update ends, AF (bit 5) when the updated time matches
///   the alarm registers 0x01/0x03/0x05 (a value with bits 7-6 set matches any), PF (bit 6) at the
///   rate register A bits 3-0 select (256 Hz, 128 Hz, then 65536 >> RS Hz for RS 3-15; 0 = none);
///   flags are set whatever register B enables and reading C returns and clears them;
/// - IRQF (C bit 7) = PF·PIE + AF·AIE + UF·UIE (register B bits 6, 5, 4), and the interrupt
///   line (IRQ 8) is high exactly while IRQF is 1, so a guest gets one edge per read of C.
///
/// Flags are computed from the clock when the guest reads; `startTimer` runs a thread that raises
/// the line on time while an enabled event is due (it sleeps while the line is already high).
public final class CMOSRTC: BusDevice, Sendable {
    /// The index port; the device spans two ports.
    public static let defaultBase: UInt64 = 0x70
    /// Number of ports.
    public static let portCount: UInt64 = 2
    /// ISA interrupt of the RTC.
    public static let defaultIRQ: UInt32 = 8
    /// UIP rises this long before the second boundary (8 cycles of the 32.768 kHz time base).
    public static let uipLeadNanos: Int64 = 244_000
    /// The update cycle ends (UF, AF) this long after the second boundary.
    public static let updateNanos: Int64 = 1_984_000

    static let regA = 0x0A, regB = 0x0B, regC = 0x0C, regD = 0x0D, century = 0x32
    static let bSET: UInt8 = 0x80, bPIE: UInt8 = 0x40, bAIE: UInt8 = 0x20, bUIE: UInt8 = 0x10
    static let bDM: UInt8 = 0x04, b24h: UInt8 = 0x02
    static let cIRQF: UInt8 = 0x80, cPF: UInt8 = 0x40, cAF: UInt8 = 0x20, cUF: UInt8 = 0x10
    static let timeIndices: Set<Int> = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32]
    static let nanosPerSecond: Int64 = 1_000_000_000

    /// The index register, CMOS bytes, clock offset and update/periodic progress (also the saved state).
    public struct State: Codable, Sendable {
        var index = 0
        var nmiDisabled = false
        var cmos = [UInt8](repeating: 0, count: 128)
        var offset: Int64 = 0
        /// The last host second (since the epoch) whose update cycle has been accounted for.
        var lastUpdate: Int64 = 0
        /// The last periodic tick accounted for (ticks of the current rate since the epoch).
        var lastTick: Int64 = 0
        /// Whether the interrupt line is asserted (IRQF).
        var irqLevel = false
    }

    private let state: Mutex<State>
    private let nanos: @Sendable () -> Int64
    private let interrupt: any InterruptLine
    private let timer = RTCTimer()

    /// Creates the RTC.
    /// - Parameters:
    ///   - nanoClock: nanoseconds since the Unix epoch, UTC (default: the host's CLOCK_REALTIME).
    ///   - interrupt: the IRQ 8 line.
    public init(nanoClock: @escaping @Sendable () -> Int64 = CMOSRTC.hostNanos,
                interrupt: any InterruptLine = NullInterruptLine()) {
        self.nanos = nanoClock
        self.interrupt = interrupt
        var s = State()
        s.cmos[Self.regA] = 0x26        // 32.768 kHz time base, 1024 Hz rate
        s.cmos[Self.regB] = Self.b24h   // 24-hour, BCD
        s.cmos[Self.regD] = 0x80
        let now = nanoClock()
        s.lastUpdate = Self.endedSecond(now)
        s.lastTick = Self.tick(now, rate: s.cmos[Self.regA])
        state = Mutex(s)
    }

    /// Creates the RTC on a clock of whole seconds (taken as the middle of each second, so UIP
    /// reads 0) and no interrupt line.
    public convenience init(clock: @escaping @Sendable () -> Int64) {
        self.init(nanoClock: { clock() &* CMOSRTC.nanosPerSecond &+ CMOSRTC.nanosPerSecond / 2 })
    }

    /// The host's CLOCK_REALTIME in nanoseconds.
    @Sendable public static func hostNanos() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) &* nanosPerSecond &+ Int64(ts.tv_nsec)
    }

    /// Whether the guest last wrote the index port with bit 7 (NMI disable) set.
    public var nmiDisabled: Bool { state.withLock { $0.nmiDisabled } }

    /// Records guest RAM sizes in CMOS as QEMU does for SeaBIOS: base memory (640 KiB, 0x15-0x16),
    /// KiB above 1 MiB up to 64 MiB (0x17-0x18 and 0x30-0x31, capped at 0xffff), 64 KiB units
    /// above 16 MiB below 4 GiB (0x34-0x35), 64 KiB units above 4 GiB (0x5b-0x5d), and the
    /// checksum of 0x10-0x2d at 0x2e-0x2f.
    public func setMemorySize(belowFourGiB: UInt64, aboveFourGiB: UInt64) {
        state.withLock { s in
            func put16(_ v: UInt64, _ at: Int) {
                let c = UInt16(min(v, 0xffff))
                s.cmos[at] = UInt8(c & 0xff)
                s.cmos[at + 1] = UInt8(c >> 8)
            }
            put16(640, 0x15)
            let ext = belowFourGiB > 1 << 20 ? (belowFourGiB - (1 << 20)) / 1024 : 0
            put16(ext, 0x17)
            put16(ext, 0x30)
            let high = belowFourGiB > 16 << 20 ? (belowFourGiB - (16 << 20)) / 65536 : 0
            put16(high, 0x34)
            let above = min(aboveFourGiB / 65536, 0xff_ffff)
            s.cmos[0x5b] = UInt8(above & 0xff)
            s.cmos[0x5c] = UInt8((above >> 8) & 0xff)
            s.cmos[0x5d] = UInt8((above >> 16) & 0xff)
            let sum = s.cmos[0x10...0x2d].reduce(UInt16(0)) { $0 &+ UInt16($1) }
            s.cmos[0x2e] = UInt8(sum >> 8)
            s.cmos[0x2f] = UInt8(sum & 0xff)
        }
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        var kick = false
        state.withLock { s in
            for i in 0..<data.count {
                let (reg, overflow) = offset.addingReportingOverflow(UInt64(i))
                if !overflow && reg == 1 {
                    data[i] = readRegister(&s)
                    if s.index == Self.regC { kick = true }
                } else {
                    data[i] = 0xff
                }
            }
        }
        if kick { timer.kick() }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        var kick = false
        state.withLock { s in
            for i in 0..<data.count {
                let (reg, overflow) = offset.addingReportingOverflow(UInt64(i))
                guard !overflow else { continue }
                if reg == 0 {
                    s.index = Int(data[i] & 0x7f)
                    s.nmiDisabled = data[i] & 0x80 != 0
                } else if reg == 1 {
                    writeRegister(data[i], &s)
                    if s.index == Self.regA || s.index == Self.regB { kick = true }
                }
            }
        }
        if kick { timer.kick() }
    }

    // MARK: Update cycle, alarm and periodic interrupt (lock held)

    /// The last host second whose update cycle has ended at `now`.
    static func endedSecond(_ now: Int64) -> Int64 {
        let t = now &- updateNanos
        return t >= 0 ? t / nanosPerSecond : (t + 1) / nanosPerSecond - 1
    }

    /// The periodic rate of register A (Hz), or 0 when off.
    static func periodicHz(_ regA: UInt8) -> Int64 {
        let rs = Int64(regA & 0x0f)
        switch rs {
        case 0: return 0
        case 1, 2: return 65536 >> (rs + 7)           // 256 Hz, 128 Hz
        default: return 65536 >> rs
        }
    }

    /// Whether register A holds the divider chain in reset.
    static func dividerReset(_ regA: UInt8) -> Bool { regA & 0x60 == 0x60 }

    /// Periodic ticks of `rate`'s frequency from the epoch to `now` (0 when off).
    static func tick(_ now: Int64, rate regA: UInt8) -> Int64 {
        let hz = periodicHz(regA)
        guard hz > 0, now > 0 else { return 0 }
        let p = now.multipliedFullWidth(by: hz)
        return nanosPerSecond.dividingFullWidth((high: p.high, low: p.low)).quotient
    }

    /// When periodic tick `n` happens (ns since the epoch), rounded up.
    static func tickTime(_ n: Int64, rate regA: UInt8) -> Int64 {
        let hz = periodicHz(regA)
        guard hz > 0, n > 0 else { return 0 }
        let p = n.multipliedFullWidth(by: nanosPerSecond)
        let (q, r) = hz.dividingFullWidth((high: p.high, low: p.low))
        return r > 0 ? q + 1 : q
    }

    /// Whether UIP reads 1 at `now`.
    private func updateInProgress(_ s: State, _ now: Int64) -> Bool {
        guard s.cmos[Self.regB] & Self.bSET == 0, !Self.dividerReset(s.cmos[Self.regA]) else { return false }
        var frac = now % Self.nanosPerSecond
        if frac < 0 { frac += Self.nanosPerSecond }
        return frac >= Self.nanosPerSecond - Self.uipLeadNanos || frac < Self.updateNanos
    }

    /// Sets the flags of every event up to `now` and drives the interrupt line.
    private func refresh(_ s: inout State, _ now: Int64) {
        let regA = s.cmos[Self.regA], regB = s.cmos[Self.regB]
        let ended = Self.endedSecond(now)
        if ended > s.lastUpdate {
            if regB & Self.bSET == 0 && !Self.dividerReset(regA) {
                s.cmos[Self.regC] |= Self.cUF
                if alarmMatches(s, seconds: (s.lastUpdate + 1)...ended) {
                    s.cmos[Self.regC] |= Self.cAF
                    alarms.add(1, ordering: .relaxed)
                }
            }
            s.lastUpdate = ended
        }
        let t = Self.dividerReset(regA) ? s.lastTick : Self.tick(now, rate: regA)
        if t > s.lastTick {
            s.cmos[Self.regC] |= Self.cPF
            s.lastTick = t
        }
        driveLine(&s)
    }

    /// Recomputes IRQF and sets the line to match.
    private func driveLine(_ s: inout State) {
        let irqf = s.cmos[Self.regC] & s.cmos[Self.regB] & (Self.cPF | Self.cAF | Self.cUF) != 0
        if irqf { s.cmos[Self.regC] |= Self.cIRQF } else { s.cmos[Self.regC] &= ~Self.cIRQF }
        if irqf != s.irqLevel {
            s.irqLevel = irqf
            interrupt.set(level: irqf)
        }
    }

    /// Whether the time of day after any update in `seconds` (host seconds) matches the alarm.
    private func alarmMatches(_ s: State, seconds: ClosedRange<Int64>) -> Bool {
        let regB = s.cmos[Self.regB]
        let binary = regB & Self.bDM != 0
        func value(_ b: UInt8) -> Int64? {
            if b & 0xc0 == 0xc0 { return nil }                 // don't care
            return binary ? Int64(b) : Int64(b >> 4) * 10 + Int64(b & 0x0f)
        }
        let sec = value(s.cmos[0x01]), min = value(s.cmos[0x03])
        var hour: Int64? = nil
        let h = s.cmos[0x05]
        if h & 0xc0 != 0xc0 {
            if regB & Self.b24h != 0 { hour = value(h) }
            else if let v = value(h & 0x7f) { hour = v % 12 + (h & 0x80 != 0 ? 12 : 0) }
        }
        // At most one day of seconds: every time of day repeats after that.
        let first = Swift.max(seconds.lowerBound, seconds.upperBound - 86_399)
        for n in first...seconds.upperBound {
            var tod = (n &+ s.offset) % 86_400
            if tod < 0 { tod += 86_400 }
            if (sec == nil || sec == tod % 60) && (min == nil || min == tod / 60 % 60) && (hour == nil || hour == tod / 3600) {
                return true
            }
        }
        return false
    }

    /// When the timer must next evaluate the flags (ns since the epoch), or nil when nothing
    /// enabled is due or the line is already high (reading C kicks the timer).
    private func nextEvent(_ s: State) -> Int64? {
        guard !s.irqLevel else { return nil }
        let regA = s.cmos[Self.regA], regB = s.cmos[Self.regB]
        guard !Self.dividerReset(regA) else { return nil }
        var next: Int64? = nil
        if regB & Self.bPIE != 0 && Self.periodicHz(regA) > 0 {
            next = Self.tickTime(s.lastTick + 1, rate: regA)
        }
        if regB & (Self.bUIE | Self.bAIE) != 0 && regB & Self.bSET == 0 {
            let update = (s.lastUpdate + 1) &* Self.nanosPerSecond &+ Self.updateNanos
            next = next.map { Swift.min($0, update) } ?? update
        }
        return next
    }

    // MARK: Registers (lock held)

    private func readRegister(_ s: inout State) -> UInt8 {
        let i = s.index
        switch i {
        case Self.regA:
            let now = nanos()
            return (s.cmos[i] & 0x7f) | (updateInProgress(s, now) ? 0x80 : 0)
        case Self.regC:
            refresh(&s, nanos())
            let v = s.cmos[i]
            s.cmos[i] = 0
            driveLine(&s)
            return v
        case Self.regD:
            return 0x80
        default:
            if Self.timeIndices.contains(i) && s.cmos[Self.regB] & Self.bSET == 0 {
                return Self.encodeTime(currentSecond() &+ s.offset, registerB: s.cmos[Self.regB])[i] ?? 0
            }
            return s.cmos[i]
        }
    }

    /// The second the time registers show: the last one whose update cycle has ended (they change
    /// as UIP falls, 1984 µs after the clock's second boundary).
    private func currentSecond() -> Int64 { Self.endedSecond(nanos()) }

    private func writeRegister(_ v: UInt8, _ s: inout State) {
        let i = s.index
        switch i {
        case Self.regA:
            let now = nanos()
            refresh(&s, now)
            s.cmos[i] = v & 0x7f
            s.lastTick = Self.tick(now, rate: s.cmos[i])   // a new rate starts counting now
        case Self.regB:
            let now = nanos()
            refresh(&s, now)
            let old = s.cmos[i]
            var v = v
            if v & Self.bSET != 0 { v &= ~Self.bUIE }        // SET clears UIE
            if old & Self.bSET == 0 && v & Self.bSET != 0 {
                s.cmos[i] = v
                snapshotTime(&s)
            } else if old & Self.bSET != 0 && v & Self.bSET == 0 {
                adoptWrittenTime(&s)
                s.cmos[i] = v
                s.lastUpdate = Self.endedSecond(now)         // no updates happened while SET
            } else {
                s.cmos[i] = v
            }
            driveLine(&s)
        case Self.regC, Self.regD:
            break   // read-only
        default:
            if Self.timeIndices.contains(i) {
                if s.cmos[Self.regB] & Self.bSET != 0 {
                    s.cmos[i] = v
                } else {
                    snapshotTime(&s)
                    s.cmos[i] = v
                    adoptWrittenTime(&s)
                }
            } else {
                s.cmos[i] = v
            }
        }
    }

    /// How many times the alarm has rung since the RTC was made (events up to now applied; nothing is cleared): a
    /// new ring wakes an ACPI S3 sleep when PM1_EN.RTC_EN is set (an AF flag left over from before does not).
    public var alarmCount: UInt64 {
        state.withLock { s in refresh(&s, nanos()) }
        return alarms.load(ordering: .relaxed)
    }
    private let alarms = Atomic<UInt64>(0)

    /// Sets CMOS byte `index` (128 bytes; not the clock or status registers), as firmware-visible NVRAM:
    /// e.g. the shutdown status byte 0x0F, which SeaBIOS reads on a reset (0xFE: resume from S3).
    public func setNVRAM(_ index: Int, _ value: UInt8) {
        guard index > Self.regD, index < 128, index != Self.century else { return }
        state.withLock { $0.cmos[index] = value }
    }

    // MARK: Timer thread

    /// Starts the thread that raises the interrupt on time (`kind`: its seccomp filter).
    public func startTimer(kind: ThreadKind? = .device) throws(HostThread.StartError) {
        try timer.start(kind: kind) { [self] in
            let now = nanos()
            return state.withLock { s -> Int64? in
                refresh(&s, now)
                return nextEvent(s).map { Swift.max(0, $0 - nanos()) }
            }
        }
    }

    /// Stops the timer thread and waits for it.
    public func stopTimer() { timer.stop() }

    /// Keeps the timer thread from raising the interrupt until `releaseTimer()` (while the machine is
    /// paused, so a snapshot sees the line and the interrupt controllers agree). Returns once no
    /// evaluation is running. Flags still follow the clock when the guest next reads them.
    public func holdTimer() { timer.hold() }

    /// Lets the timer thread run again.
    public func releaseTimer() { timer.release() }

    /// Copies the running time into the time registers.
    private func snapshotTime(_ s: inout State) {
        for (i, v) in Self.encodeTime(currentSecond() &+ s.offset, registerB: s.cmos[Self.regB]) { s.cmos[i] = v }
    }

    /// Makes the time in the registers the clock's time.
    private func adoptWrittenTime(_ s: inout State) {
        if let t = Self.decodeTime(s.cmos, registerB: s.cmos[Self.regB]) {
            s.offset = t &- currentSecond()
        }
    }

    /// The time registers' values for `seconds` since the epoch (UTC) in the format `registerB` selects.
    static func encodeTime(_ seconds: Int64, registerB: UInt8) -> [Int: UInt8] {
        var t = time_t(seconds)
        var tm = Glibc.tm()
        guard gmtime_r(&t, &tm) != nil else { return [:] }
        let binary = registerB & bDM != 0
        func enc(_ x: Int32) -> UInt8 {
            let x = UInt8(clamping: max(0, x))
            return binary ? x : (x / 10) << 4 | (x % 10)
        }
        var hour = enc(tm.tm_hour)
        if registerB & b24h == 0 {
            let h12 = tm.tm_hour % 12 == 0 ? 12 : tm.tm_hour % 12
            hour = enc(h12) | (tm.tm_hour >= 12 ? 0x80 : 0)
        }
        let year = Int32(tm.tm_year) + 1900
        return [0x00: enc(tm.tm_sec), 0x02: enc(tm.tm_min), 0x04: hour, 0x06: enc(tm.tm_wday + 1),
                0x07: enc(tm.tm_mday), 0x08: enc(tm.tm_mon + 1), 0x09: enc(year % 100),
                century: enc(year / 100)]
    }

    /// Seconds since the epoch for the time registers in `cmos`, or nil if they make no date.
    static func decodeTime(_ cmos: [UInt8], registerB: UInt8) -> Int64? {
        let binary = registerB & bDM != 0
        func dec(_ b: UInt8) -> Int32 { binary ? Int32(b) : Int32(b >> 4) * 10 + Int32(b & 0x0f) }
        var hour = dec(cmos[0x04])
        if registerB & b24h == 0 {
            let pm = cmos[0x04] & 0x80 != 0
            hour = dec(cmos[0x04] & 0x7f) % 12 + (pm ? 12 : 0)
        }
        var tm = Glibc.tm()
        tm.tm_sec = dec(cmos[0x00])
        tm.tm_min = dec(cmos[0x02])
        tm.tm_hour = hour
        tm.tm_mday = dec(cmos[0x07])
        tm.tm_mon = dec(cmos[0x08]) - 1
        tm.tm_year = dec(cmos[century]) * 100 + dec(cmos[0x09]) - 1900
        let t = timegm(&tm)
        return t == -1 ? nil : Int64(t)
    }
}

extension CMOSRTC: StatefulDevice {
    /// Version 2 added the update, periodic and interrupt-line state.
    public static let stateVersion: UInt32 = 2

    public func saveState() -> State { state.withLock { $0 } }

    public func restoreState(_ saved: State) throws(DeviceStateError) {
        guard saved.cmos.count == 128 else { throw DeviceStateError("rtc: \(saved.cmos.count) CMOS bytes, expected 128") }
        guard (0..<128).contains(saved.index) else { throw DeviceStateError("rtc: index \(saved.index) out of range") }
        state.withLock { s in
            s = saved
            interrupt.set(level: s.irqLevel)
        }
        timer.kick()
    }
}

/// The RTC's timer thread: runs `evaluate` (which returns how long until it is next needed, or nil
/// for "until kicked") in a loop until stopped; not while held. `evaluate` runs under the timer's
/// lock, so once `hold()` returns no evaluation is running or will start.
final class RTCTimer: @unchecked Sendable {
    private let lock = ConditionLock()
    private var kicked = false
    private var stopped = false
    private var held = false
    private var handle: HostThread.Handle?

    func start(kind: ThreadKind?, evaluate: @escaping @Sendable () -> Int64?) throws(HostThread.StartError) {
        let running = lock.withLock { () -> Bool in
            if handle == nil { stopped = false }
            return handle != nil
        }
        guard !running else { return }
        let h = try HostThread.start(name: "rtc", kind: kind) { [self] in
            while true {
                let stop = lock.withLock { () -> Bool in
                    if stopped { return true }
                    let wait = held ? nil : evaluate()
                    if !stopped && !kicked {
                        // Wake at most every 60 s even with nothing due (cheap, and bounds a missed kick).
                        _ = lock.wait(seconds: wait.map { Double(min($0, 60_000_000_000)) / 1e9 } ?? 60)
                    }
                    kicked = false
                    return stopped
                }
                if stop { return }
            }
        }
        lock.withLock { handle = h }
    }

    func kick() { lock.withLock { kicked = true; lock.signal() } }

    func hold() { lock.withLock { held = true } }

    func release() { lock.withLock { held = false; kicked = true; lock.signal() } }

    func stop() {
        let h = lock.withLock { () -> HostThread.Handle? in
            stopped = true
            lock.signal()
            defer { handle = nil }
            return handle
        }
        h?.join()
    }
}
