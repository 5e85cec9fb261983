import Foundation
import Testing
@testable import Manager

/// The `swiftkvm vm` client's formatting and socket choice (no daemon needed).
@Suite("swiftkvm vm client: table, info, socket path")
struct VMFormatTests {
    @Test("list prints virsh's table: Id (pid or -), Name, State with spaces, aligned columns")
    func table() {
        let text = VMFormat.table([VMSummary(name: "web1", state: "running", pid: 1234),
                                   VMSummary(name: "db", state: "shut off")])
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        #expect(lines[0] == " Id     Name   State")
        #expect(lines[1].allSatisfy { $0 == "-" } && lines[1].count >= lines[0].count)
        #expect(lines[2] == " 1234   web1   running")
        #expect(lines[3] == " -      db     shut off")
        #expect(VMFormat.table([]).split(separator: "\n").count == 2, "header and rule only")
    }

    @Test("info prints key: value lines, with the last exit when there is one")
    func info() {
        let vm = VMSummary(name: "web1", state: "shut off", autostart: true, vcpus: 2, memMib: 128,
                           lastExit: .init(reason: "reset", status: 3, at: "2026-11-23T21:00:00Z"))
        let text = VMFormat.info(vm)
        #expect(text.contains("Name:           web1\n"))
        #expect(text.contains("State:          shut off\n"))
        #expect(text.contains("Memory:         128 MiB\n"))
        #expect(text.contains("Autostart:      enable\n"))
        #expect(text.contains("Last exit:      reset (status 3) at 2026-11-23T21:00:00Z\n"))
        #expect(!text.contains("Uptime"))
    }

    @Test("the daemon socket: --socket, else $SWIFTKVM_SOCKET, else $SWIFTKVM_STATE_DIR/daemon.sock, else /var/lib/swiftkvm")
    func socketPath() {
        #expect(VMClient.socketPath(option: "/a.sock", environment: ["SWIFTKVM_SOCKET": "/b.sock"]) == "/a.sock")
        #expect(VMClient.socketPath(option: nil, environment: ["SWIFTKVM_SOCKET": "/b.sock", "SWIFTKVM_STATE_DIR": "/s"]) == "/b.sock")
        #expect(VMClient.socketPath(option: nil, environment: ["SWIFTKVM_STATE_DIR": "/s/"]) == "/s/daemon.sock")
        #expect(VMClient.socketPath(option: nil, environment: [:]) == "/var/lib/swiftkvm/daemon.sock")
    }

    @Test("VMInfo JSON decodes with only name and state, and with every field")
    func decode() throws {
        let minimal = try JSONDecoder().decode(VMSummary.self, from: Data(#"{"name":"a","state":"paused","future_field":1}"#.utf8))
        #expect(minimal == VMSummary(name: "a", state: "paused"))
        let full = try JSONDecoder().decode(VMSummary.self, from: Data("""
            {"name":"web1","state":"running","autostart":false,"pid":1234,"vcpus":1,"mem_mib":128,
             "uptime_s":12.5,"api_socket":"/r/api.sock","console_socket":"/r/console.sock",
             "serial_log":"/l/s.log","vmm_log":"/l/v.log","last_exit":{"reason":"poweroff","status":0,"at":"T"}}
            """.utf8))
        #expect(full.pid == 1234 && full.memMib == 128 && full.consoleSocket == "/r/console.sock" && full.lastExit?.reason == "poweroff")
        #expect(full.isActive)
        #expect(VMClient.pathComponent("a b/c") == "a%20b%2Fc")
    }
}
