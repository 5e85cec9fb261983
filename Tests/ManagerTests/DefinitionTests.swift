import API
import Foundation
import Testing
@testable import Manager

/// A temporary directory removed by `cleanup()`.
final class TempDir: @unchecked Sendable {
    let path: String
    init() throws { path = try makeShortTempDir() }
    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String, _ text: String = "x") throws -> String {
        let p = path + "/" + name
        try text.write(toFile: p, atomically: true, encoding: .utf8)
        return p
    }
}

@Suite("VM definitions")
struct DefinitionTests {
    func parse(_ text: String) throws(ManagerError) -> VMDefinition {
        try VMDefinition.parse(Array(text.utf8), source: "test.json")
    }

    func error(_ text: String) -> String {
        do {
            _ = try parse(text)
            return "(no error)"
        } catch {
            #expect(error.kind == .invalid)
            #expect(error.message.hasPrefix("invalid definition (test.json): "), "\(error.message)")
            return error.message
        }
    }

    @Test("a full definition parses: manager keys and the Firecracker part")
    func good() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let kernel = try dir.file("k.elf"), disk = try dir.file("d.img")
        let d = try parse("""
        {"name": "web-1.a_b", "autostart": true, "shutdown_timeout_s": 5,
         "boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "console=ttyS0"},
         "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
         "drives": [{"drive_id": "root", "path_on_host": "\(disk)", "is_root_device": true, "is_read_only": false}]}
        """)
        #expect(d.name == "web-1.a_b")
        #expect(d.autostart)
        #expect(d.shutdownTimeout == 5)
        #expect(d.vcpus == 2 && d.memMib == 256)
        #expect(d.config.bootSource?.kernelImagePath == kernel)
        #expect(d.config.drives.first?.pathOnHost == disk)
        // The normalized JSON parses back to the same definition.
        #expect(try VMDefinition.parse(d.normalizedJSON(), source: "again") == d)
    }

    @Test("defaults: no autostart, no timeout, Firecracker's machine defaults")
    func defaults() throws {
        let d = try parse(#"{"name": "a"}"#)
        #expect(!d.autostart)
        #expect(d.shutdownTimeout == nil)
        #expect(d.vcpus == 1 && d.memMib == 128)
        #expect(d.config.bootSource == nil)
    }

    @Test("an unknown key is an error naming it")
    func unknownKey() {
        #expect(error(#"{"name": "a", "colour": "red"}"#).contains("`colour`"))
        #expect(error(#"{"name": "a", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "turbo": 1}}"#).contains("`turbo`"))
    }

    @Test("wrong types name the key")
    func wrongTypes() {
        #expect(error(#"{"name": 5}"#).contains("`name`"))
        #expect(error(#"{"name": "a", "autostart": "yes"}"#).contains("`autostart`"))
        #expect(error(#"{"name": "a", "shutdown_timeout_s": "soon"}"#).contains("`shutdown_timeout_s`"))
        #expect(error(#"{"name": "a", "shutdown_timeout_s": -1}"#).contains("`shutdown_timeout_s`"))
        #expect(error(#"{"name": "a", "machine-config": {"vcpu_count": "two", "mem_size_mib": 64}}"#).contains("machine-config.vcpu_count"))
    }

    @Test("a missing or bad name is refused with the name in the message")
    func badName() {
        #expect(error(#"{"autostart": true}"#).contains("missing key `name`"))
        for bad in ["", "-x", ".x", "a/b", "a b", String(repeating: "a", count: 65), "é"] {
            #expect(error(#"{"name": "\#(bad)"}"#).contains("key `name`"), "\(bad)")
        }
        #expect(VMDefinition.isValidName("a"))
        #expect(VMDefinition.isValidName(String(repeating: "a", count: 64)))
    }

    @Test("relative paths are refused naming the key")
    func relativePath() {
        let m = error(#"{"name": "a", "boot-source": {"kernel_image_path": "k.elf"}}"#)
        #expect(m.contains("boot-source.kernel_image_path") && m.contains("absolute"))
        let d = error(#"{"name": "a", "drives": [{"drive_id": "r", "path_on_host": "disk.img", "is_root_device": true}]}"#)
        #expect(d.contains("drives[0].path_on_host") && d.contains("absolute"))
    }

    @Test("missing files are refused naming the key and the path")
    func missingFile() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let kernel = try dir.file("k.elf")
        let m = error(#"{"name": "a", "boot-source": {"kernel_image_path": "\#(kernel)", "initrd_path": "\#(dir.path)/none.cpio"}}"#)
        #expect(m.contains("boot-source.initrd_path") && m.contains("\(dir.path)/none.cpio"))
    }

    @Test("logger, metrics and serial are refused: the manager owns those paths")
    func refusedKeys() {
        for key in ["logger", "metrics", "serial"] {
            let m = error(#"{"name": "a", "\#(key)": {}}"#)
            #expect(m.contains("`\(key)`") && m.contains("not allowed"), "\(m)")
        }
    }

    @Test("malformed JSON and non-objects are clear errors")
    func malformed() {
        #expect(error("{").contains("malformed JSON"))
        #expect(error("[1]").contains("JSON object"))
    }

    @Test("the vmm config gets the default guest when there is no boot-source")
    func defaultGuest() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        _ = try dir.file("vmlinuz")
        _ = try dir.file("initramfs.cpio")
        let d = try parse(#"{"name": "a"}"#)
        let c = try d.vmmConfig(assetsDirectory: dir.path)
        #expect(c.bootSource?.kernelImagePath == dir.path + "/vmlinuz")
        #expect(c.bootSource?.initrdPath == dir.path + "/initramfs.cpio")
        #expect(c.bootSource?.bootArgs?.contains("console=ttyS0") == true)
        let e = #expect(throws: ManagerError.self) { try d.vmmConfig(assetsDirectory: nil) }
        #expect(e?.message.contains("SWIFTKVM_ASSETS") == true)
    }
}

@Suite("Definition store")
struct DefinitionStoreTests {
    @Test("save writes normalized JSON atomically (no temp file left) and loadAll reads it back")
    func saveLoad() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let store = DefinitionStore(directory: dir.path + "/vms")
        let a = try VMDefinition.parse(Array(#"{"name": "a", "autostart": true}"#.utf8), source: "a")
        let b = try VMDefinition.parse(Array(#"{"name": "b", "machine-config": {"vcpu_count": 2, "mem_size_mib": 64}}"#.utf8), source: "b")
        try store.save(a)
        try store.save(b)
        #expect(try FileManager.default.contentsOfDirectory(atPath: store.directory).sorted() == ["a.json", "b.json"])
        let (defs, errors) = store.loadAll()
        #expect(errors.isEmpty)
        #expect(defs == [a, b])
        // Replacing keeps one file with the new content.
        var a2 = a
        a2.autostart = false
        try store.save(a2)
        #expect(store.loadAll().definitions.first == a2)
        try store.remove("a")
        #expect(store.loadAll().definitions == [b])
    }

    @Test("a corrupt file and a file whose name does not match are skipped, each error naming its file")
    func corrupt() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let store = DefinitionStore(directory: dir.path)
        try store.save(try VMDefinition.parse(Array(#"{"name": "good"}"#.utf8), source: "g"))
        _ = try dir.file("broken.json", "{\"name\": ")
        _ = try dir.file("other.json", #"{"name": "different"}"#)
        _ = try dir.file("notes.txt", "ignored")
        let (defs, errors) = store.loadAll()
        #expect(defs.map(\.name) == ["good"])
        #expect(errors.count == 2)
        #expect(errors.contains { $0.message.contains(dir.path + "/broken.json") })
        #expect(errors.contains { $0.message.contains(dir.path + "/other.json") && $0.message.contains("does not match") })
    }

    @Test("AtomicFile.write replaces content and fails clearly in a missing directory")
    func atomic() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let p = dir.path + "/f"
        try AtomicFile.write(Array("one".utf8), to: p)
        try AtomicFile.write(Array("two".utf8), to: p)
        #expect(try AtomicFile.read(p) == Array("two".utf8))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["f"])
        let e = #expect(throws: ManagerError.self) { try AtomicFile.write([1], to: dir.path + "/no/f") }
        #expect(e?.message.contains(dir.path + "/no") == true)
    }
}

@Suite("Event log")
struct EventLogTests {
    @Test("events get increasing seq numbers, are appended as JSON lines and replayed after a seq")
    func seqReplay() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let log = EventLog(path: dir.path + "/events.log")
        let seen = Collected()
        let (id, replayEmpty) = log.subscribe(since: nil) { seen.add("\($0.seq) \($0.vm) \($0.event)") }
        #expect(replayEmpty.isEmpty)
        log.emit(vm: "a", "defined")
        log.emit(vm: "a", "starting")
        log.emit(vm: "b", "started", "pid 1")
        #expect(seen.all == ["1 a defined", "2 a starting", "3 b started"])
        log.unsubscribe(id)
        log.emit(vm: "a", "stopped")
        #expect(seen.all.count == 3)
        #expect(log.events(since: 2).map(\.seq) == [3, 4])
        let (_, replay) = log.subscribe(since: 3) { _ in }
        #expect(replay.map(\.event) == ["stopped"])
        let lines = try String(contentsOfFile: log.path, encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 4)
        let third = try JSONDecoder().decode(VMEvent.self, from: Data(lines[2].utf8))
        #expect(third.vm == "b" && third.detail == "pid 1" && third.seq == 3)
    }

    @Test("a reopened log continues the sequence and replays stored events; bad lines are skipped")
    func reopen() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/events.log"
        let first = EventLog(path: path)
        first.emit(vm: "a", "defined")
        first.emit(vm: "a", "started")
        let fd = open(path, O_WRONLY | O_APPEND)
        _ = write(fd, "not json\n", 9)
        close(fd)
        let second = EventLog(path: path)
        #expect(second.lastSeq == 2)
        #expect(second.emit(vm: "a", "stopped").seq == 3)
        #expect(second.events(since: 0).map(\.event) == ["defined", "started", "stopped"])
    }
}
