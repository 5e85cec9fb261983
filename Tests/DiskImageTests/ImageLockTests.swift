import Foundation
import Testing
@testable import DiskImage
#if canImport(Glibc)
import Glibc
#endif

/// The OFD lock bytes anyone holds on `path`.
func lockedBytes(_ path: String) throws -> Set<Int> { ImageLock.heldBytes(path: path) }

@Suite("Image locking (qemu's protocol, in one process: separate file descriptions conflict as processes do)")
struct ImageLockTests {
    func image(_ d: TempDir, _ name: String = "a.qcow2", backing: String? = nil) throws -> String {
        var o = Qcow2CreateOptions(size: 1 << 20)
        o.backingFile = backing
        o.backingFormat = backing == nil ? nil : "qcow2"
        try Qcow2Image.create(path: d.file(name), options: o)
        return d.file(name)
    }

    func lockError(_ body: () throws -> Void) -> String? {
        do { try body() } catch let e as DiskImageError where e.kind == .locked { return e.message } catch { return "other: \(error)" }
        return nil
    }

    @Test("a writer locks bytes 100, 101, 103 and 201, 203 of a qcow2 image, as qemu-io does; a raw writer only 100, 101")
    func bytesOfAWriter() throws {
        let d = try TempDir()
        let q = try image(d)
        let w = try lockImageChain(path: q, request: .write)
        #expect(try lockedBytes(q) == [100, 101, 103, 201, 203])
        w.releaseAll()
        #expect(try lockedBytes(q).isEmpty, "released")
        let r = d.file("r.raw")
        try RawImage.create(path: r, size: 4096).close()
        let rw = try lockImageChain(path: r, request: .init(permissions: [.consistentRead, .write]))
        #expect(try lockedBytes(r) == [100, 101])
        rw.releaseAll()
        let guest = try lockImageChain(path: r, request: .guestDisk(readOnly: false))
        #expect(try lockedBytes(r) == [100, 101, 201], "QEMU's virtio-blk: no other writer")
        guest.releaseAll()
    }

    @Test("a second writer is refused with qemu's \"write\" message naming the file; a reader with the \"shared write\" one; -U is not")
    func conflicts() throws {
        let d = try TempDir()
        let q = try image(d)
        let w = try lockImageChain(path: q, request: .write)
        #expect(lockError { _ = try lockImageChain(path: q, request: .write) }
                == "Could not open '\(q)': Failed to get \"write\" lock\nIs another process using the image [\(q)]?")
        #expect(lockError { _ = try lockImageChain(path: q, request: .read()) }
                == "Could not open '\(q)': Failed to get shared \"write\" lock\nIs another process using the image [\(q)]?")
        #expect(lockError { _ = try lockImageChain(path: q, request: .info()) } != nil)
        #expect(lockError { _ = try lockImageChain(path: q, request: .read(forceShare: true)).releaseAll() } == nil)
        #expect(lockError { _ = try lockImageChain(path: q, request: .info(forceShare: true)).releaseAll() } == nil)
        #expect(try lockedBytes(q) == [100, 101, 103, 201, 203], "a refused request leaves no lock behind")
        w.releaseAll()
        #expect(lockError { _ = try lockImageChain(path: q, request: .write).releaseAll() } == nil, "free after release")
    }

    @Test("readers share: two readers, guest read-only disks, and a writer is refused while they read")
    func readersShare() throws {
        let d = try TempDir()
        let q = try image(d)
        let a = try lockImageChain(path: q, request: .read())
        let b = try lockImageChain(path: q, request: .guestDisk(readOnly: true))
        let c = try lockImageChain(path: q, request: .info())
        #expect(lockError { _ = try lockImageChain(path: q, request: .write) }?.contains("Failed to get \"write\" lock") == true)
        [a, b, c].forEach { $0.releaseAll() }
    }

    @Test("the chain: backing files are locked for reading (no writer), shared by two overlays; commit's upgrade of the base is refused while another overlay reads it")
    func chain() throws {
        let d = try TempDir()
        let base = try image(d, "base.qcow2")
        let o1 = try image(d, "o1.qcow2", backing: "base.qcow2")
        let o2 = try image(d, "o2.qcow2", backing: "base.qcow2")
        let l1 = try lockImageChain(path: o1, request: .guestDisk(readOnly: false))
        #expect(l1.map(\.path) == [o1, d.file("base.qcow2")])
        #expect(try lockedBytes(base) == [100, 201, 203])
        let l2 = try lockImageChain(path: o2, request: .write)
        #expect(lockError { _ = try lockImageChain(path: base, request: .write) }?.contains("[\(d.file("base.qcow2"))]") == true)
        #expect(lockError { try l2[1].update(for: .write, format: .qcow2) }
                == "Failed to get \"write\" lock\nIs another process using the image [\(d.file("base.qcow2"))]?")
        #expect(l2[1].current.permissions == .consistentRead, "a refused upgrade restores the previous locks")
        l1.releaseAll()
        try l2[1].update(for: .write, format: .qcow2)
        #expect(l2[1].current.permissions == [.consistentRead, .write, .resize])
        l2.releaseAll()
        #expect(try lockedBytes(base).isEmpty)
    }

    @Test("followBacking: false locks the image alone; a missing backing file is left to the open")
    func alone() throws {
        let d = try TempDir()
        let o = try image(d, "o.qcow2", backing: "missing.qcow2")
        let l = try lockImageChain(path: o, request: .read())
        #expect(l.count == 1)
        l.releaseAll()
        #expect(throws: DiskImageError.self) { _ = try lockImageChain(path: d.file("nothing.qcow2"), request: .read()) }
    }
}
