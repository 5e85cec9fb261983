#if canImport(Glibc)
import Glibc
#endif

/// The default guest booted by `swiftkvm run` without `--kernel` or `--flat`: Debian's stock
/// kernel and a busybox initramfs in the project's `assets/` folder (built by `scripts/guest-assets`).
public enum DefaultGuest {
    /// The kernel command line that boots Debian's stock 6.1 kernel on PVM hosts (HOST-KVM.md,
    /// without `pci=off` so PCI devices can be found). Each item avoids an instruction the host
    /// cannot emulate or skips slow emulated work.
    public static let cmdline = [
        "console=ttyS0", "reboot=k", "panic=-1", "tsc=reliable", "noxsave", "mitigations=off", "rodata=off",
        "cryptomgr.notests",
        // Emulated BTF parsing on the first module load runs for minutes here; the soft-lockup
        // detector's stack dumps only slow it down further.
        "nosoftlockup",
        "clearcpuid=popcnt,fsgsbase,smap,erms,fsrm,aes,pclmulqdq,ssse3,sse4_1,sse4_2,sha_ni,gfni,vaes,vpclmulqdq",
        "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,bpf_key_sig_kfuncs_init,"
            + "bpf_prog_test_run_init,bpf_rstat_kfunc_init,bpf_tcp_ca_kfunc_init,cubictcp_register,kfunc_init,"
            + "load_system_certificate_list",
        "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
    ].joined(separator: " ")

    /// The items of `cmdline` that a Linux guest needs on PVM hosts whatever its own command line (HOST-KVM.md):
    /// each avoids an instruction the host cannot emulate or minutes of emulated work. The console, reboot and panic
    /// choices stay the guest's.
    public static let hostSafeItems: [String] = cmdline.split(separator: " ").map(String.init).filter {
        !["console", "reboot", "panic"].contains(itemKey($0))
    }

    /// The key of a command-line item (`clearcpuid` of `clearcpuid=…`, `noxsave` of `noxsave`).
    static func itemKey(_ item: some StringProtocol) -> String {
        guard let eq = item.firstIndex(of: "=") else { return String(item) }
        return String(item[..<eq])
    }

    /// Items whose values are comma lists that the host's values extend rather than replace.
    static let listItems: Set<String> = ["clearcpuid", "initcall_blacklist"]

    /// `line` with each of `hostSafeItems` it lacks inserted before any ` -- ` (what follows it is init's), a
    /// guest's own `clearcpuid=` or `initcall_blacklist=` extended by the host's values it lacks, any other item the
    /// guest sets left as it is; and what was added.
    public static func addingHostSafeItems(to line: String) -> (line: String, added: [String]) {
        var words = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        let end = words.firstIndex(of: "--") ?? words.endIndex
        var added: [String] = []
        var inserted: [String] = []
        for item in hostSafeItems {
            let key = itemKey(item)
            guard let i = words[..<end].firstIndex(where: { itemKey($0) == key }) else {
                inserted.append(item)
                added.append(item)
                continue
            }
            guard listItems.contains(key) else { continue }
            let have = Set(words[i].dropFirst(key.count + 1).split(separator: ",").map(String.init))
            let missing = item.dropFirst(key.count + 1).split(separator: ",").map(String.init).filter { !have.contains($0) }
            guard !missing.isEmpty else { continue }
            words[i] += (have.isEmpty ? "" : ",") + missing.joined(separator: ",")
            if !words[i].contains("=") { words[i] = key + "=" + missing.joined(separator: ",") }
            added.append("\(key)+=\(missing.joined(separator: ","))")
        }
        guard !added.isEmpty else { return (line, []) }
        words.insert(contentsOf: inserted, at: end)
        return (words.joined(separator: " "), added)
    }

    /// The default command line, plus `swiftkvm.modules=1` when the machine has virtio devices: the
    /// default initramfs then loads the virtio and ext4 modules (which costs minutes on PVM hosts, so
    /// a machine without virtio devices skips it).
    public static func cmdline(withVirtioDevices: Bool) -> String {
        withVirtioDevices ? cmdline + " swiftkvm.modules=1" : cmdline
    }

    /// Which kernel the default guest boots; both use the same initramfs.
    public enum Kernel: String, Sendable, CaseIterable {
        /// Debian's stock kernel (`assets/vmlinuz`, from `scripts/guest-assets`); its virtio and ext4 drivers are
        /// modules that the initramfs loads.
        case stock
        /// The lean kernel (`assets/lean/vmlinux`, from `scripts/guest-kernel`): every driver a VM needs is built
        /// in, and nothing else, so it boots in a fraction of the stock kernel's time.
        case lean

        /// The kernel's path inside the assets folder.
        public var fileName: String { self == .stock ? DefaultGuest.kernelName : "lean/vmlinux" }
        /// The script that builds it.
        public var builder: String { self == .stock ? "scripts/guest-assets" : "scripts/guest-kernel" }
    }

    /// The lean kernel's command line: the PVM-safe items that concern the CPU (the lean kernel has no modules,
    /// ftrace, BPF or PS/2 to work around).
    public static let leanCmdline = [
        "console=ttyS0", "reboot=k", "panic=-1", "tsc=reliable", "noxsave", "mitigations=off", "rodata=off",
        "nosoftlockup",
        "clearcpuid=popcnt,fsgsbase,smap,erms,fsrm,aes,pclmulqdq,ssse3,sse4_1,sse4_2,sha_ni,gfni,vaes,vpclmulqdq",
    ].joined(separator: " ")

    /// The default command line of `kernel`, with `swiftkvm.modules=1` for the stock kernel when the machine has
    /// virtio devices.
    public static func cmdline(for kernel: Kernel, withVirtioDevices: Bool) -> String {
        kernel == .lean ? leanCmdline : cmdline(withVirtioDevices: withVirtioDevices)
    }

    /// Kernel file name inside the assets folder.
    public static let kernelName = "vmlinuz"
    /// Initramfs file name inside the assets folder.
    public static let initrdName = "initramfs.cpio"

    /// The assets folder: `$SWIFTKVM_ASSETS` when set, else the first `assets/` holding `kernel`
    /// found walking up from the executable's directory (e.g. `<package>/.build/debug/swiftkvm`).
    public static func assetsDirectory(environment: [String: String], executablePath: String?,
                                       kernel: Kernel = .stock) -> String? {
        if let dir = environment["SWIFTKVM_ASSETS"], !dir.isEmpty { return dir }
        guard var dir = executablePath.map(parentDirectory) else { return nil }
        for _ in 0..<8 {
            let candidate = dir + "/assets"
            if access(candidate + "/" + kernel.fileName, F_OK) == 0 { return candidate }
            let parent = parentDirectory(dir)
            if parent == dir { break }
            dir = parent
        }
        return nil
    }

    /// The running executable (`/proc/self/exe`).
    public static func executablePath() -> String? {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func parentDirectory(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let p = String(path[..<slash])
        return p.isEmpty ? "/" : p
    }
}
