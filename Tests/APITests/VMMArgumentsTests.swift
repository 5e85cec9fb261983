import Testing
@testable import API

@Suite("vmm command-line fast path")
struct VMMArgumentsTests {
    @Test("no arguments give VMMCommand's defaults")
    func defaults() throws {
        let o = try #require(VMMArguments.parse([String]()))
        let d = VMMProcess.Options()
        #expect(o.apiSocket == "/run/firecracker.socket" && o.apiSocket == d.apiSocket)
        #expect(o.instanceID == "anonymous-instance")
        #expect(o.metricsInterval == 60)
        #expect(o.maxPayloadSize == APIServer.defaultMaxBodySize)
        #expect(!o.noAPI && o.configFile == nil && o.logPath == nil && o.level == nil && !o.showLevel && !o.showLogOrigin)
        #expect(o.metricsPath == nil && o.consoleSocket == nil && o.serialLog == nil && o.readyFD == nil)
        #expect(!o.enablePCI && !d.enablePCI, "virtio-mmio unless --enable-pci, as Firecracker")
    }

    @Test("--enable-pci is a flag; a value for it is left to ArgumentParser")
    func enablePCI() throws {
        #expect(try #require(VMMArguments.parse(["--enable-pci", "--id", "x"])).enablePCI)
        #expect(VMMArguments.parse(["--enable-pci=yes"]) == nil)
        #expect(try #require(VMMArguments.parse(["--ksm"])).ksm)
        #expect(try #require(VMMArguments.parse(["--id", "x"])).ksm == false)
        #expect(VMMArguments.parse(["--ksm=on"]) == nil)
    }

    @Test("every option is recognised, as --name value and --name=value; Firecracker's no-op options are accepted")
    func allOptions() throws {
        let o = try #require(VMMArguments.parse([
            "--api-sock", "/tmp/a.sock", "--id=vm1", "--config-file", "/tmp/c.json", "--no-api", "--log-path", "/tmp/log",
            "--level", "Debug", "--show-level", "--show-log-origin", "--metrics-path=/tmp/m", "--metrics-interval", "2.5",
            "--http-api-max-payload-size", "4096", "--console-sock", "/tmp/con.sock", "--serial-log", "/tmp/serial",
            "--ready-fd", "3", "--no-seccomp", "--seccomp-filter", "f.bpf", "--boot-timer", "--start-time-us", "1", "--start-time-cpu-us", "2",
            "--parent-cpu-time-us", "3", "--module", "x",
        ]))
        #expect(o.apiSocket == "/tmp/a.sock")
        #expect(o.instanceID == "vm1")
        #expect(o.configFile == "/tmp/c.json")
        #expect(o.noAPI)
        #expect(o.logPath == "/tmp/log")
        #expect(o.level == "Debug")
        #expect(o.showLevel && o.showLogOrigin)
        #expect(o.metricsPath == "/tmp/m")
        #expect(o.metricsInterval == 2.5)
        #expect(o.maxPayloadSize == 4096)
        #expect(o.consoleSocket == "/tmp/con.sock")
        #expect(o.serialLog == "/tmp/serial")
        #expect(o.readyFD == 3)
    }

    @Test("help, unknown options, bad or missing values and --no-api alone are left to ArgumentParser",
          arguments: [["--help"], ["-h"], ["help"], ["--bogus"], ["--api-sock"], ["--api-sock", "--id", "x"], ["--level", "Loud"],
                      ["--metrics-interval", "-1"], ["--metrics-interval", "nan"], ["--http-api-max-payload-size", "0"],
                      ["--ready-fd", "2"], ["--ready-fd", "x"], ["--no-api"], ["--no-api=yes", "--config-file", "c"], ["--id", "a", "--id", "b"], ["stray"], ["--"],
                      ["--version"], ["--generate-completion-script", "bash"]])
    func fallback(args: [String]) {
        #expect(VMMArguments.parse(args) == nil)
    }
}
