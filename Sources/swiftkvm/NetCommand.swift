import ArgumentParser
import FoundationEssentials
import Manager
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm net`: virsh's net-* verbs, a client of `swiftkvm daemon`.
struct NetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net",
        abstract: "Manage networks through the swiftkvm daemon (nat, routed, isolated, bridge), as virsh net-* does.",
        discussion: """
        A network definition is JSON: {"name": "default", "mode": "nat", "address": "192.168.100.1/24", \
        "dhcp_range": {"start": "192.168.100.10", "end": "192.168.100.200"}, "autostart": true} \
        ("bridge" names the bridge: generated swk-NAME, or the existing host bridge for mode bridge). \
        VMs join it with "nics": [{"network": "default"}] in their definition. The daemon socket is \
        --socket, else $SWIFTKVM_SOCKET, else daemon.sock in the state directory. Errors exit with 1, \
        usage errors with 2.
        """,
        subcommands: [NetDefineCommand.self, NetUndefineCommand.self, NetListCommand.self, NetStartCommand.self,
                      NetStopCommand.self, NetInfoCommand.self, NetLeasesCommand.self, NetAutostartCommand.self]
    )

    @OptionGroup var options: VMSocketOptions
}

extension VMSocketOptions {
    var netClient: NetClient { NetClient(socketPath: VMClient.socketPath(option: socket)) }
}

struct NetDefineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "define", abstract: "Define (or redefine) a network from a JSON file.")
    @ParentCommand var parent: NetCommand
    @Argument(help: "The definition file.") var file: String

    func run() throws {
        try vmRun { () throws(ManagerError) in
            guard let data = FileManager.default.contents(atPath: file) else {
                throw ManagerError(.invalid, "cannot read the network definition file \(file): \(String(cString: strerror(errno)))")
            }
            // Checked here first, so that errors name the file (the daemon checks it again, with the host's routes).
            _ = try NetworkDefinition.parse(Array(data), source: file)
            let (net, replaced) = try parent.options.netClient.define(Array(data))
            vmPrint("Network '\(net.name)' \(replaced ? "redefined (takes effect at its next start)" : "defined") from \(file)")
        }
    }
}

struct NetUndefineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "undefine", abstract: "Remove an inactive network's definition.")
    @ParentCommand var parent: NetCommand
    @Argument(help: "The network's name.") var name: String
    func run() throws {
        try vmRun { () throws(ManagerError) in
            try parent.options.netClient.undefine(name)
            vmPrint("Network '\(name)' has been undefined")
        }
    }
}

struct NetListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List active networks (--all: every defined network).")
    @ParentCommand var parent: NetCommand
    @Flag(name: .long, help: "Also list inactive networks.") var all = false
    func run() throws {
        try vmRun { () throws(ManagerError) in vmPrint(NetFormat.list(try parent.options.netClient.list(all: all))) }
    }
}

struct NetStartCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "start", abstract: "Start a network: bridge, address, nftables, forwarding, dnsmasq.")
    @ParentCommand var parent: NetCommand
    @Argument(help: "The network's name.") var name: String
    func run() throws {
        try vmRun { () throws(ManagerError) in
            _ = try parent.options.netClient.changeState(name, action: "start")
            vmPrint("Network '\(name)' started")
        }
    }
}

struct NetStopCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop", abstract: "Stop a network, removing everything it added (refused while running VMs use it).")
    @ParentCommand var parent: NetCommand
    @Argument(help: "The network's name.") var name: String
    func run() throws {
        try vmRun { () throws(ManagerError) in
            _ = try parent.options.netClient.changeState(name, action: "stop")
            vmPrint("Network '\(name)' stopped")
        }
    }
}

struct NetInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show a network's state, bridge, addresses, dnsmasq and VMs.")
    @ParentCommand var parent: NetCommand
    @Argument(help: "The network's name.") var name: String
    func run() throws {
        try vmRun { () throws(ManagerError) in vmPrint(NetFormat.info(try parent.options.netClient.info(name))) }
    }
}

struct NetLeasesCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dhcp-leases", abstract: "List the DHCP leases dnsmasq handed out on a network.")
    @ParentCommand var parent: NetCommand
    @Argument(help: "The network's name.") var name: String
    func run() throws {
        try vmRun { () throws(ManagerError) in
            let client = parent.options.netClient
            let net = try client.info(name)
            let prefix = net.address.flatMap { $0.split(separator: "/").last.flatMap { Int($0) } }
            vmPrint(NetFormat.leases(try client.leases(name), prefix: prefix))
        }
    }
}

struct NetAutostartCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "autostart", abstract: "Start the network whenever the daemon starts (--disable: don't).")
    @ParentCommand var parent: NetCommand
    @Argument(help: "The network's name.") var name: String
    @Flag(name: .long, help: "Turn autostart off.") var disable = false
    func run() throws {
        try vmRun { () throws(ManagerError) in
            _ = try parent.options.netClient.setAutostart(name, !disable)
            vmPrint("Network '\(name)' \(disable ? "unmarked as autostarted" : "marked as autostarted")")
        }
    }
}
