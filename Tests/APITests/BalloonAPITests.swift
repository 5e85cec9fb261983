import Foundation
import Testing
@testable import API
@testable import Virtio
import VMM

extension FakeVM {
    func setBalloonTarget(mib: UInt32) throws {
        guard config.balloon != nil else { throw VMMError.invalidConfiguration("this VM has no balloon device") }
        balloonCalls.withLock { $0.targets.append(mib) }
    }
    func setBalloonStatsInterval(_ seconds: UInt32) throws { balloonCalls.withLock { $0.intervals.append(seconds) } }
    var balloonStatus: (status: VirtioBalloon.Status, statistics: [String: UInt64])? {
        guard let b = config.balloon else { return nil }
        let target = balloonCalls.withLock { $0.targets.last } ?? b.amountMiB
        return (VirtioBalloon.Status(targetPages: target * 256, actualPages: target * 256 - 10, inflatedPages: 0, deflatedPages: 0,
                                     reportedBytes: 0, invalidEntries: 0),
                ["free_memory": 100 << 20, "total_memory": 200 << 20])
    }
}

@Suite("The balloon over the API (fake guests)")
struct BalloonAPITests {
    @Test("PUT /balloon reaches the VM configuration; PATCH before start changes it; after start PATCH reaches the device; GET /balloon and /balloon/statistics report; GET /vm/config shows it")
    func lifecycle() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 256}"#).status == 204)
        #expect(try f.send("GET", "/balloon").status == 400, "no balloon yet")
        #expect(try f.send("PUT", "/balloon", #"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 2, "free_page_reporting": true}"#).status == 204)
        #expect(try f.send("PATCH", "/balloon", #"{"amount_mib": 32}"#).status == 204)
        #expect(try f.send("GET", "/balloon/statistics").status == 400, "statistics need a running guest")
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        let vm = try #require(f.built.withLock { $0.first })
        #expect(vm.config.balloon == BalloonSpec(amountMiB: 32, deflateOnOOM: true, statsIntervalS: 2, freePageReporting: true))

        #expect(try f.send("PATCH", "/balloon", #"{"amount_mib": 100}"#).status == 204)
        #expect(vm.balloonCalls.withLock { $0.targets } == [100])
        #expect(try f.send("GET", "/balloon").json?["amount_mib"] as? Int == 100)
        let stats = try #require(f.send("GET", "/balloon/statistics").json)
        #expect(stats["target_mib"] as? Int == 100 && stats["target_pages"] as? Int == 25_600 && stats["actual_pages"] as? Int == 25_590)
        #expect(stats["free_memory"] as? Int == 100 << 20 && stats["total_memory"] as? Int == 200 << 20)
        #expect(try f.send("PATCH", "/balloon/statistics", #"{"stats_polling_interval_s": 7}"#).status == 204)
        #expect(vm.balloonCalls.withLock { $0.intervals } == [7])
        let balloon = try #require(f.send("GET", "/vm/config").json?["balloon"] as? [String: Any])
        #expect(balloon["amount_mib"] as? Int == 100 && balloon["stats_polling_interval_s"] as? Int == 7
                && balloon["deflate_on_oom"] as? Bool == true && balloon["free_page_reporting"] as? Bool == true)
        #expect(try f.send("PUT", "/balloon", #"{"amount_mib": 1, "deflate_on_oom": false}"#).status == 400, "PUT after start")
    }

    @Test("bad balloon requests are 400s naming the field, and change nothing")
    func badInput() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 128}"#).status == 204)
        for (body, word) in [(#"{"amount_mib": 129, "deflate_on_oom": false}"#, "amount_mib"),
                             (#"{"amount_mib": -1, "deflate_on_oom": false}"#, "amount_mib"),
                             (#"{"amount_mib": 1}"#, "deflate_on_oom"),
                             (#"{"amount_mib": 1, "deflate_on_oom": false, "stats_polling_interval_s": 100000}"#, "stats_polling_interval_s"),
                             (#"{"amount_mib": 1, "deflate_on_oom": false, "surprise": 1}"#, "surprise")] {
            let r = try f.send("PUT", "/balloon", body)
            #expect(r.status == 400 && r.body.contains(word), "\(body): \(r.status) \(r.body)")
        }
        #expect(try f.send("PATCH", "/balloon", #"{"amount_mib": 1}"#).status == 400, "PATCH without a balloon")
        #expect(try f.send("PUT", "/balloon", #"{"amount_mib": 100, "deflate_on_oom": false}"#).status == 204)
        // Memory shrunk below the balloon after PUT /balloon: InstanceStart refuses, naming both.
        #expect(try f.send("PATCH", "/machine-config", #"{"mem_size_mib": 64}"#).status == 204)
        let start = try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(start.status == 400 && start.body.contains("amount_mib") && start.body.contains("mem_size_mib"), "\(start.body)")
        #expect(try f.send("PATCH", "/machine-config", #"{"mem_size_mib": 128}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(try f.send("PATCH", "/balloon/statistics", #"{"stats_polling_interval_s": 5}"#).status == 400,
                "statistics were not enabled at boot")
    }
}
