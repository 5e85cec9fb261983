import Devices
import DiskImage
import Foundation
import Logging
import Testing
@testable import VMM

@Suite("--disk parsing")
struct DiskSpecTests {
    @Test("every key is parsed; defaults are probe, writable, no id, no backing files")
    func keys() throws {
        let d = try DiskSpec(parsing: "path=/x/a.qcow2,format=qcow2,readonly=on,id=disk-a,backing_files=on")
        #expect(d == DiskSpec(path: "/x/a.qcow2", format: "qcow2", readOnly: true, id: "disk-a", backingFiles: true))
        #expect(try DiskSpec(parsing: "path=a.img") == DiskSpec(path: "a.img"))
        #expect(try DiskSpec(parsing: "readonly=off,path=a.img").readOnly == false)
        #expect(try DiskSpec(parsing: "path=a.img,cache=none").cache == "none")
        #expect(try DiskSpec(parsing: "path=a.img").cache == "writeback")
    }

    @Test("unknown keys, a missing path, bad values and repeated keys are usage errors naming the key")
    func bad() {
        func message(_ text: String) -> String {
            do { _ = try DiskSpec(parsing: text); return "" } catch let e as VMMError {
                #expect(e.isUsageError)
                return e.description
            } catch { return "\(error)" }
        }
        #expect(message("path=a.img,aio=native").contains("unknown key 'aio'"))
        #expect(message("format=raw").contains("path=FILE is required"))
        #expect(message("path=a.img,format=vmdk").contains("format=vmdk"))
        #expect(message("path=a.img,readonly=maybe").contains("readonly=maybe"))
        #expect(message("path=a.img,path=b.img").contains("'path' given twice"))
        #expect(message("path=a.img,id=" + String(repeating: "x", count: 21)).contains("1 to 20 bytes"))
        #expect(message("a.img").contains("not key=value"))
        #expect(message("path=").contains("path is empty"))
        #expect(message("path=a.img,cache=unsafe").contains("cache=unsafe"))
        #expect(message("path=a.qcow2,format=qcow2,cache=none").contains("raw"))
    }
}

@Suite("--balloon parsing")
struct BalloonSpecTests {
    @Test("MIB with options; defaults off; bad sizes, options and intervals name the problem")
    func parse() throws {
        #expect(try BalloonSpec(parsing: "64") == BalloonSpec(amountMiB: 64, deflateOnOOM: false, statsIntervalS: 0, freePageReporting: false))
        #expect(try BalloonSpec(parsing: "0,deflate-on-oom,free-page-reporting,stats=5")
                == BalloonSpec(amountMiB: 0, deflateOnOOM: true, statsIntervalS: 5, freePageReporting: true))
        for (bad, words) in [("", "MiB"), ("-1", "MiB"), ("64,turbo", "unknown option 'turbo'"), ("64,stats=x", "stats="),
                             ("64,stats=100000", "stats=")] {
            do {
                _ = try BalloonSpec(parsing: bad)
                Issue.record("'\(bad)' was accepted")
            } catch {
                #expect("\(error)".contains(words) && "\(error)".contains("--balloon"), "\(error)")
            }
        }
    }
}

@Suite("virtio devices in a Machine", .enabled(if: FileManager.default.fileExists(atPath: "/dev/kvm"), "needs /dev/kvm"), .serialized)
struct VirtioMachineTests {
    final class Output: SerialOutput, @unchecked Sendable { func write(_ b: [UInt8]) {} }

    func temp(_ name: String, size: Int) throws -> String {
        let p = FileManager.default.temporaryDirectory.appendingPathComponent("vmm-virtio-\(getpid())-\(UInt32.random(in: 0...UInt32.max))-\(name)").path
        try Data(count: size).write(to: URL(fileURLWithPath: p))
        return p
    }

    func machine(_ configure: (inout VMConfiguration) -> Void) throws -> Machine {
        let prog = try temp("hlt.bin", size: 0)
        defer { try? FileManager.default.removeItem(atPath: prog) }
        try Data([0xfa, 0xf4]).write(to: URL(fileURLWithPath: prog)) // cli; hlt
        var config = VMConfiguration(payload: .flat(FlatImage(path: prog, loadAddress: 0x1000, entry: 0x1000, mode: .real)))
        config.memorySize = 16 << 20
        configure(&config)
        return try Machine(config: config, serialOutput: Output(), logger: Logger(label: "test"))
    }

    @Test("disks, console and rng sit in slots 1… in that order with virtio IDs, and the machine runs and stops")
    func slots() throws {
        let a = try temp("a.img", size: 1 << 20), b = try temp("b.img", size: 1 << 20)
        defer { for p in [a, b] { try? FileManager.default.removeItem(atPath: p) } }
        let m = try machine { c in
            c.disks = [DiskSpec(path: a), DiskSpec(path: b, readOnly: true)]
            c.virtioConsole = true
            c.rng = true
        }
        let ids = m.pciRoot.devices.map { ($0.slot, $0.device.configuration.vendorID, $0.device.configuration.deviceID) }
        #expect(ids.map(\.0) == [0, 1, 2, 3, 4])
        #expect(ids.dropFirst().allSatisfy { $0.1 == 0x1af4 })
        #expect(ids.map(\.2) == [0x0d57, 0x1042, 0x1042, 0x1043, 0x1044])
        #expect(m.run(handleSignals: false) == .powerOff)
    }

    @Test("a disk given twice (locked), a missing file and a bad format are usage errors naming the disk")
    func badDisks() throws {
        let a = try temp("a.img", size: 1 << 20)
        defer { try? FileManager.default.removeItem(atPath: a) }
        func error(_ disks: [DiskSpec]) -> VMMError? {
            do { _ = try machine { $0.disks = disks }; return nil } catch let e as VMMError { return e } catch {
                Issue.record("unexpected \(error)")
                return nil
            }
        }
        let twice = error([DiskSpec(path: a), DiskSpec(path: a)])
        #expect(twice?.isUsageError == true)
        #expect(twice?.description.contains(#"Failed to get "write" lock"#) == true, "\(String(describing: twice))")
        let missing = error([DiskSpec(path: a + ".missing")])
        #expect(missing?.description.contains(".missing") == true)
        let qcow = error([DiskSpec(path: a, format: "qcow2")])
        #expect(qcow?.isUsageError == true)
        // Two read-only users may share an image.
        #expect(error([DiskSpec(path: a, readOnly: true), DiskSpec(path: a, readOnly: true)]) == nil)
    }

    @Test("a qcow2 overlay with a backing file needs backing_files=on; with it the machine builds and the base stays read-only")
    func backingFiles() throws {
        let base = try temp("base.raw", size: 1 << 20)
        let overlay = base + ".qcow2"
        defer { for p in [base, overlay] { try? FileManager.default.removeItem(atPath: p) } }
        var o = Qcow2CreateOptions(size: 1 << 20)
        o.backingFile = base
        o.backingFormat = "raw"
        try Qcow2Image.create(path: overlay, options: o)
        do {
            _ = try machine { $0.disks = [DiskSpec(path: overlay, format: "qcow2")] }
            Issue.record("backing file opened without backing_files=on")
        } catch let e as VMMError {
            #expect(e.isUsageError)
            #expect(e.description.contains("backing_files=on"))
        }
        try FileManager.default.setAttributes([.posixPermissions: 0o444], ofItemAtPath: base)
        let m = try machine { $0.disks = [DiskSpec(path: overlay, format: "qcow2", backingFiles: true)] }
        #expect(m.pciRoot.devices.count == 2)
    }
}
