import CKVM
import CSeccomp
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The kinds of VMM thread, each with its own seccomp filter. The raw values are the keys of a filter
/// file (`--seccomp-filter`; `vmm`, `api` and `vcpu` are Firecracker's names).
public enum ThreadKind: String, CaseIterable, Sendable {
    /// The main and control threads: the VMM's main thread, `Machine.run`'s control thread, the API
    /// controller once the guest started.
    case vmm
    /// The API server's event loop (SwiftNIO).
    case api
    /// A vCPU thread (`KVM_RUN` and the exits handled on it).
    case vcpu
    /// A device thread: a virtio event loop or one of its I/O workers.
    case device
    /// A console thread: stdin to the serial port, or the console socket server.
    case console
}

/// A seccomp action (libseccomp's SCMP_ACT_*).
public enum SeccompAction: Equatable, Sendable {
    case allow, trap, log, killThread, killProcess
    case errno(UInt32)
    case trace(UInt32)

    var value: UInt32 {
        switch self {
        case .allow: return SCMP_ACT_ALLOW
        case .trap: return SCMP_ACT_TRAP
        case .log: return SCMP_ACT_LOG
        case .killThread: return SCMP_ACT_KILL_THREAD
        case .killProcess: return SCMP_ACT_KILL_PROCESS
        case .errno(let e): return 0x0005_0000 | (e & 0xffff)  // SCMP_ACT_ERRNO(e)
        case .trace(let e): return 0x7ff0_0000 | (e & 0xffff)  // SCMP_ACT_TRACE(e)
        }
    }
}

/// One condition on a syscall argument.
public struct SeccompCondition: Equatable, Sendable {
    public enum Operator: Equatable, Sendable {
        case eq, ne, lt, le, gt, ge
        /// `(arg & mask) == value`.
        case maskedEq(UInt64)
    }
    /// The argument's index (0-5).
    public var index: UInt32
    public var op: Operator
    public var value: UInt64
    /// Compare only the low 32 bits (`dword`; `eq` and `masked_eq` only, others compare 64 bits).
    public var dword: Bool

    public init(index: UInt32, op: Operator, value: UInt64, dword: Bool = false) {
        self.index = index
        self.op = op
        self.value = value
        self.dword = dword
    }

    /// Shorthand for `arg[index] == value`.
    public static func arg(_ index: UInt32, _ value: UInt64) -> SeccompCondition {
        SeccompCondition(index: index, op: .eq, value: value)
    }

    var cmp: scmp_arg_cmp {
        var c = scmp_arg_cmp()
        c.arg = index
        c.datum_b = value
        switch op {
        case .eq where dword:
            c.op = SCMP_CMP_MASKED_EQ; c.datum_a = 0xffff_ffff; c.datum_b = value & 0xffff_ffff
        case .eq: c.op = SCMP_CMP_EQ; c.datum_a = value
        case .ne: c.op = SCMP_CMP_NE; c.datum_a = value
        case .lt: c.op = SCMP_CMP_LT; c.datum_a = value
        case .le: c.op = SCMP_CMP_LE; c.datum_a = value
        case .gt: c.op = SCMP_CMP_GT; c.datum_a = value
        case .ge: c.op = SCMP_CMP_GE; c.datum_a = value
        case .maskedEq(let mask):
            c.op = SCMP_CMP_MASKED_EQ; c.datum_a = dword ? mask & 0xffff_ffff : mask
        }
        return c
    }
}

/// A syscall allowed (or matched) when all its conditions hold. Several rules for one syscall are or-ed.
public struct SeccompRule: Equatable, Sendable {
    public var syscall: String
    public var conditions: [SeccompCondition]
    public init(_ syscall: String, _ conditions: [SeccompCondition] = []) {
        self.syscall = syscall
        self.conditions = conditions
    }
}

/// One thread kind's filter: `filterAction` for a call that matches a rule, `defaultAction` otherwise.
public struct SeccompFilter: Equatable, Sendable {
    public var defaultAction: SeccompAction
    public var filterAction: SeccompAction
    public var rules: [SeccompRule]
    public init(defaultAction: SeccompAction = .trap, filterAction: SeccompAction = .allow, rules: [SeccompRule]) {
        self.defaultAction = defaultAction
        self.filterAction = filterAction
        self.rules = rules
    }

    /// The distinct syscalls the filter names.
    public var syscalls: Set<String> { Set(rules.map(\.syscall)) }
}

/// Why a filter could not be built or installed.
public struct SeccompError: Error, CustomStringConvertible, Equatable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Per-thread seccomp-BPF confinement (libseccomp). `configure` compiles one filter per thread kind
/// (before any thread is confined); each thread then calls `confineCurrentThread(kind)` as it starts
/// (`HostThread.start(kind:)` does), before it touches guest data. Until `configure` is called (library
/// users, tests), confinement is off and `confineCurrentThread` does nothing.
///
/// A filter's default action is normally `trap`: the SIGSYS reporter (CKVM) writes one line naming the
/// syscall and the thread kind to stderr, and the process dies of SIGSYS.
public enum Seccomp {
    private struct Compiled: @unchecked Sendable {
        /// One libseccomp context per kind, kept for the process's life; `seccomp_load` on each thread.
        var contexts: [ThreadKind: OpaquePointer] = [:]
        var exempt: Set<ThreadKind> = []
    }
    private static let compiled = Mutex(Compiled())
    private static let enabled = Atomic<Bool>(false)

    /// Whether filters were configured (and threads confine themselves).
    public static var isEnabled: Bool { enabled.load(ordering: .acquiring) }

    /// Compiles `filters` (one per kind) and turns confinement on. Throws, naming the kind and rule, on
    /// an unknown syscall or a rule libseccomp refuses. Threads of the kinds in `exempt` stay unconfined.
    /// Call once, before threads are confined.
    public static func configure(_ filters: [ThreadKind: SeccompFilter], exempt: Set<ThreadKind> = []) throws(SeccompError) {
        var contexts: [ThreadKind: OpaquePointer] = [:]
        func release() { for c in contexts.values { seccomp_release(UnsafeMutableRawPointer(c)) } }
        for kind in ThreadKind.allCases {
            guard let filter = filters[kind] else {
                release()
                throw SeccompError("no filter for thread kind '\(kind.rawValue)'")
            }
            do {
                contexts[kind] = try compile(filter, kind: kind)
            } catch {
                release()
                throw error
            }
        }
        // Names for the SIGSYS report (resolved now: the handler may not allocate).
        for nr in 0..<512 {
            if let name = seccomp_syscall_resolve_num_arch(UInt32(SCMP_ARCH_NATIVE), Int32(nr)) {
                ckvm_sigsys_set_syscall_name(Int32(nr), name)
                free(name)
            }
        }
        _ = ckvm_install_sigsys_reporter()
        // Load the time zone now: the first log line's timestamp would otherwise open /etc/localtime on
        // whichever (confined) thread logs first.
        tzset()
        primeMallocHeapShrink()
        compiled.withLock { c in
            for old in c.contexts.values { seccomp_release(UnsafeMutableRawPointer(old)) }
            c.contexts = contexts
            c.exempt = exempt
        }
        enabled.store(true, ordering: .releasing)
    }

    /// glibc's malloc reads /proc/sys/vm/overcommit_memory the first time a thread's arena gives memory
    /// back (`shrink_heap`), on whichever thread that is: a confined device thread that freed a large
    /// buffer was killed for that openat (the vsock bench, 2026-12-07). This makes it happen now, on a
    /// short-lived unconfined thread of its own arena: the answer is kept for the process's life. It is
    /// not certain (glibc raises its trim threshold after large frees, and the thread may share an
    /// arena), so the filters also answer that open with EACCES (`compile`).
    static func primeMallocHeapShrink() {
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { _ in
            let size = 64 << 10 // below the mmap threshold: the blocks come from this thread's arena heap
            var blocks: [UnsafeMutableRawPointer] = []
            blocks.reserveCapacity(32)
            for _ in 0..<32 {
                guard let p = malloc(size) else { break }
                memset(p, 1, size)
                blocks.append(p)
            }
            // Freed top-down, the heap's top grows past the trim threshold and the heap shrinks.
            for p in blocks.reversed() { free(p) }
            return nil
        }, nil)
        if rc == 0 { pthread_join(thread, nil) }
    }

    /// Checks `filter` compiles (unknown syscalls, bad conditions) without installing anything.
    public static func validate(_ filter: SeccompFilter, kind: ThreadKind) throws(SeccompError) {
        let ctx = try compile(filter, kind: kind)
        seccomp_release(UnsafeMutableRawPointer(ctx))
    }

    private static func compile(_ filter: SeccompFilter, kind: ThreadKind) throws(SeccompError) -> OpaquePointer {
        guard let raw = seccomp_init(filter.defaultAction.value) else {
            throw SeccompError("filter '\(kind.rawValue)': invalid default action \(filter.defaultAction)")
        }
        let ctx = OpaquePointer(raw)
        for (i, rule) in filter.rules.enumerated() {
            let nr = seccomp_syscall_resolve_name(rule.syscall)
            guard nr != __NR_SCMP_ERROR else {
                seccomp_release(raw)
                throw SeccompError("filter '\(kind.rawValue)', rule \(i + 1): unknown syscall '\(rule.syscall)'")
            }
            if let bad = rule.conditions.first(where: { $0.index > 5 }) {
                seccomp_release(raw)
                throw SeccompError("filter '\(kind.rawValue)', rule \(i + 1) (\(rule.syscall)): argument index \(bad.index) is not 0-5")
            }
            let cmps = rule.conditions.map(\.cmp)
            let rc = cmps.withUnsafeBufferPointer {
                seccomp_rule_add_array(raw, filter.filterAction.value, nr, UInt32($0.count), $0.baseAddress)
            }
            // -EEXIST: the same rule twice, harmless.
            guard rc == 0 || rc == -EEXIST else {
                seccomp_release(raw)
                throw SeccompError("filter '\(kind.rawValue)', rule \(i + 1) (\(rule.syscall)): libseccomp refused it: \(String(cString: strerror(-rc)))")
            }
        }
        // glibc's heap trim probe (see `primeMallocHeapShrink`): a filter that does not name openat answers
        // a read-only open relative to the working directory with EACCES instead of trapping. Nothing is
        // opened either way; glibc then keeps trimming its heaps without the file.
        if !filter.syscalls.contains("openat"), filter.defaultAction != .allow {
            let cmps = [SeccompCondition(index: 0, op: .eq, value: UInt64(UInt32(bitPattern: AT_FDCWD)), dword: true),
                        SeccompCondition(index: 2, op: .eq, value: UInt64(O_RDONLY | O_CLOEXEC), dword: true)].map(\.cmp)
            let rc = cmps.withUnsafeBufferPointer {
                seccomp_rule_add_array(raw, SeccompAction.errno(UInt32(EACCES)).value, seccomp_syscall_resolve_name("openat"),
                                       UInt32($0.count), $0.baseAddress)
            }
            guard rc == 0 || rc == -EEXIST else {
                seccomp_release(raw)
                throw SeccompError("filter '\(kind.rawValue)': libseccomp refused the openat probe rule: \(String(cString: strerror(-rc)))")
            }
        }
        return ctx
    }

    /// The kind of filter the calling thread installed (nil: none yet).
    private static let installedKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    /// Installs `kind`'s filter on the calling thread (once per thread: a second call does nothing), when
    /// confinement is on. A filter that cannot be loaded stops the process (exit 1) with a message: running
    /// unconfined when confinement was asked for is not an option.
    public static func confineCurrentThread(_ kind: ThreadKind) {
        guard isEnabled else { return }
        let key = installedKey
        guard pthread_getspecific(key) == nil else { return }
        let rc: Int32 = compiled.withLock { c in
            guard !c.exempt.contains(kind) else { return 0 }
            guard let ctx = c.contexts[kind] else { return -EINVAL }
            ckvm_sigsys_set_thread_kind(kind.rawValue)
            return seccomp_load(UnsafeMutableRawPointer(ctx))
        }
        guard rc == 0 else {
            let line = "swiftkvm: error: cannot install the seccomp filter of a '\(kind.rawValue)' thread: \(String(cString: strerror(-rc)))\n"
            _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
            _exit(1)
        }
        pthread_setspecific(key, UnsafeRawPointer(bitPattern: 1))
    }
}
