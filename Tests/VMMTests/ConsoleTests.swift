#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import Devices
@testable import VMM

/// Waits (up to 10 s, polling) until `condition` holds; returns whether it did.
private func eventually(_ condition: () -> Bool) -> Bool {
    for _ in 0..<1000 {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

/// Collects what a ConsoleInput delivers.
private final class InputRecorder: Sendable {
    let bytes = Mutex<[UInt8]>([])
    let quits = Atomic<Int>(0)
    let eofs = Atomic<Int>(0)

    func console(fd: Int32) -> ConsoleInput {
        ConsoleInput(fileDescriptor: fd,
                     onInput: { b in self.bytes.withLock { $0 += b } },
                     onQuit: { self.quits.add(1, ordering: .relaxed) },
                     onEOF: { self.eofs.add(1, ordering: .relaxed) })
    }
    var received: [UInt8] { bytes.withLock { $0 } }
}

@Suite("Console")
struct ConsoleTests {
    @Test("--serial accepts stdio, none and file:PATH and names anything else in its error")
    func specParsing() throws {
        #expect(try SerialSpec(parsing: "stdio") == .stdio)
        #expect(try SerialSpec(parsing: "none") == .none)
        #expect(try SerialSpec(parsing: "file:/tmp/x.log") == .file("/tmp/x.log"))
        #expect(try SerialSpec(parsing: "file:a:b") == .file("a:b"))
        for bad in ["", "file:", "tcp:1234", "STDIO", "stdio "] {
            #expect(throws: ConsoleError.badSerialSpec(bad)) { try SerialSpec(parsing: bad) }
        }
        #expect(ConsoleError.badSerialSpec("tcp:1").description.contains("\"tcp:1\""))
        #expect(SerialSpec.file("/x").description == "file:/x")
    }

    @Test("Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A h asks for help, other escapes are swallowed")
    func escapes() {
        var e = ConsoleEscape()
        #expect(e.feed(Array("ls\n".utf8)) == [.input(Array("ls\n".utf8))])
        #expect(e.feed([0x61, 0x01, 0x01, 0x62]) == [.input([0x61, 0x01, 0x62])])
        #expect(e.feed([0x61, 0x01, UInt8(ascii: "h"), 0x62]) == [.input([0x61]), .help, .input([0x62])])
        #expect(e.feed([0x01, UInt8(ascii: "z"), 0x63]) == [.input([0x63])])
        #expect(e.feed([0x64, 0x01, UInt8(ascii: "x"), 0x65]) == [.input([0x64]), .quit])
        // An escape split across two reads.
        var s = ConsoleEscape()
        #expect(s.feed([0x66, 0x01]) == [.input([0x66])])
        #expect(s.feed([UInt8(ascii: "x")]) == [.quit])
        #expect(s.feed([0x01]) == [])
        #expect(s.feed([0x01]) == [.input([0x01])])
        // Ctrl-C is ordinary input for the guest.
        #expect(s.feed([0x03]) == [.input([0x03])])
    }

    @Test("file output writes every byte; none discards; a missing directory is a clear error")
    func fileOutput() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("console-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("serial.log").path
        let out = try ConsoleOutput(spec: .file(path))
        out.write(Array("hello ".utf8))
        out.write(Array("world\n".utf8))
        out.flush()
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data("hello world\n".utf8))
        #expect(out.writtenBytes == 12 && out.droppedBytes == 0)
        out.close()
        out.write([1])
        #expect(out.writtenBytes == 12)

        let none = try ConsoleOutput(spec: .none)
        none.write([1, 2, 3])
        #expect(none.writtenBytes == 0 && none.droppedBytes == 0)

        let bad = dir.appendingPathComponent("missing/serial.log").path
        #expect(throws: ConsoleError.cannotOpen(path: bad, errno: ENOENT)) { try ConsoleOutput(spec: .file(bad)) }
    }

    @Test("output to a full non-blocking pipe waits and loses nothing; a closed pipe drops and counts")
    func pipeOutput() throws {
        var fds: [Int32] = [-1, -1]
        // Close-on-exec: a child process spawned by a parallel test must not inherit (and keep open)
        // the read end, or the write below would not see EPIPE.
        try #require(pipe(&fds) == 0)
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFL, O_NONBLOCK)
        let out = ConsoleOutput(fileDescriptor: fds[1], owning: true)
        let payload = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let writer = Thread { out.write(payload) }
        writer.start()
        var got: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while got.count < payload.count {
            let n = buf.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n <= 0 { break }
            got += buf[0..<n]
        }
        #expect(got == payload)
        #expect(eventually { out.writtenBytes == UInt64(payload.count) })
        // With the reader gone, writes fail with EPIPE (SIGPIPE ignored here) and are counted.
        let old = signal(SIGPIPE, SIG_IGN)
        defer { signal(SIGPIPE, old) }
        close(fds[0])
        out.write([1, 2, 3])
        // A child forked by a parallel test may hold the read end until it execs: retry briefly.
        #expect(eventually {
            if out.droppedBytes == 0 { out.write([1, 2, 3]) }
            return out.droppedBytes >= 3 && out.droppedBytes % 3 == 0
        })
        out.close()
    }

    @Test("piped input reaches the guest unmodified, and end of input does not quit")
    func pipedInput() throws {
        var fds: [Int32] = [-1, -1]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]) }
        let rec = InputRecorder()
        let console = rec.console(fd: fds[0])
        #expect(!console.isTerminal)
        try console.start()
        let text: [UInt8] = Array("echo hi\n".utf8) + [0x01, UInt8(ascii: "x"), 0x03]
        _ = text.withUnsafeBytes { write(fds[1], $0.baseAddress, $0.count) }
        #expect(eventually { rec.received == text })
        close(fds[1])
        #expect(eventually { rec.eofs.load(ordering: .relaxed) == 1 })
        #expect(rec.quits.load(ordering: .relaxed) == 0)
        console.stop()
    }

    @Test("a terminal is put in raw mode, Ctrl-A escapes apply, and stop() restores its settings")
    func terminalInput() throws {
        // posix_openpt/unlockpt/ptsname are not imported; use /dev/ptmx and its ioctls.
        let master = open("/dev/ptmx", O_RDWR | O_NOCTTY)
        try #require(master >= 0)
        defer { close(master) }
        var unlock: Int32 = 0, number: UInt32 = 0
        try #require(ioctl(master, UInt(0x4004_5431) /* TIOCSPTLCK */, &unlock) == 0)
        try #require(ioctl(master, UInt(0x8004_5430) /* TIOCGPTN */, &number) == 0)
        let slave = open("/dev/pts/\(number)", O_RDWR | O_NOCTTY)
        try #require(slave >= 0)
        defer { close(slave) }
        var before = termios()
        try #require(tcgetattr(slave, &before) == 0)
        try #require(before.c_lflag & tcflag_t(ICANON) != 0)

        let rec = InputRecorder()
        let console = rec.console(fd: slave)
        #expect(console.isTerminal)
        try console.start()
        var raw = termios()
        #expect(tcgetattr(slave, &raw) == 0)
        #expect(raw.c_lflag & tcflag_t(ICANON | ECHO | ISIG) == 0)

        let keys: [UInt8] = Array("ls".utf8) + [0x01, 0x01, 0x03]
        _ = keys.withUnsafeBytes { write(master, $0.baseAddress, $0.count) }
        #expect(eventually { rec.received == Array("ls".utf8) + [0x01, 0x03] })
        _ = [0x01, UInt8(ascii: "x")].withUnsafeBytes { write(master, $0.baseAddress, $0.count) }
        #expect(eventually { rec.quits.load(ordering: .relaxed) == 1 })
        console.stop()
        var after = termios()
        #expect(tcgetattr(slave, &after) == 0)
        #expect(after.c_lflag == before.c_lflag && after.c_iflag == before.c_iflag)
    }

    @Test("ConsoleOutput serves as the UART's output sink")
    func uartToConsole() throws {
        var fds: [Int32] = [-1, -1]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]) }
        let out = ConsoleOutput(fileDescriptor: fds[1], owning: true)
        let uart = Serial16550(interrupt: NullInterruptLine(), output: out)
        for b in Array("ok\n".utf8) {
            [b].withUnsafeBytes { uart.write(offset: 0, data: $0) }
        }
        uart.flush()
        out.close()
        var buf = [UInt8](repeating: 0, count: 16)
        let n = buf.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
        #expect(Array(buf[0..<max(0, n)]) == Array("ok\n".utf8))
    }
}

@Suite("Console wiring")
struct ConsoleWiringTests {
    @Test("stdio input feeds the UART's receiver; file and none take no input")
    func attach() throws {
        var fds: [Int32] = [-1, -1]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let console = try Console(spec: .stdio)
        let uart = Serial16550(interrupt: NullInterruptLine(), output: DiscardSerialOutput())
        try console.attachInput(to: uart, fileDescriptor: fds[0], onQuit: {})
        #expect(!console.isInteractive)
        _ = [UInt8(ascii: "q")].withUnsafeBytes { write(fds[1], $0.baseAddress, 1) }
        #expect(eventually { uart.pendingInputBytes == 1 })
        console.shutdown()
        console.shutdown()

        let none = try Console(spec: .none)
        try none.attachInput(to: uart, fileDescriptor: fds[0], onQuit: {})
        _ = [UInt8(ascii: "r")].withUnsafeBytes { write(fds[1], $0.baseAddress, 1) }
        var b: UInt8 = 0
        #expect(read(fds[0], &b, 1) == 1 && b == UInt8(ascii: "r"), "nobody else read the pipe")
        none.shutdown()
    }
}

@Suite("Console reader lifecycle")
struct ConsoleLifecycleTests {
    @Test("stop() called from the reader's own callback neither deadlocks nor leaks the thread")
    func stopFromCallback() throws {
        var fds: [Int32] = [-1, -1]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let holder = Mutex<ConsoleInput?>(nil)
        let stopped = Atomic<Bool>(false)
        let console = ConsoleInput(fileDescriptor: fds[0], onInput: { _ in
            holder.withLock { $0 }?.stop()
            stopped.store(true, ordering: .releasing)
        }, onQuit: {})
        holder.withLock { $0 = console }
        try console.start()
        _ = [UInt8(0x41)].withUnsafeBytes { write(fds[1], $0.baseAddress, 1) }
        #expect(eventually { stopped.load(ordering: .acquiring) })
        console.stop()
        holder.withLock { $0 = nil }
    }
}
