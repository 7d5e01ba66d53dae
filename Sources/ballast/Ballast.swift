import BallastCore
import BallastRuntime

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

@main
enum Ballast {
    static func main() {
        let version = "ballast \(BallastVersion.string) (\(BallastVersion.build))"
        exit(root.main(Array(CommandLine.arguments.dropFirst()), path: ["ballast"], version: version))
    }

    static let configOpt = Opt(long: "config", short: "c", value: "config", help: "The YAML configuration file.")
    static let socketHelp = "The stats socket: a Unix socket path or a loopback ip:port."

    static var root: Command {
        let c = Command("ballast", "A Layer-4 TCP load balancer for Linux.")
        c.subcommands = [run, check, ctl, health, nft, debug]
        return c
    }

    /// A failure of the command itself (not of its command line): the message, exit status 1.
    static func fail(_ message: String) -> CLIExit {
        writeStderr("ballast: \(message)")
        return .status(1)
    }

    static var run: Command {
        let c = Command(
            "run", "Run Ballast in the foreground. SIGHUP reloads the config; SIGTERM or SIGINT stops gracefully.")
        var config = configOpt
        config.required = true
        c.options = [
            config,
            Opt(
                long: "notify",
                help: "Require systemd's notify protocol (Type=notify): fail at once when $NOTIFY_SOCKET is unset."),
        ]
        c.run = { (p: Parsed) throws(CLIExit) in
            if p.flag("notify") && SystemdNotifier.fromProcessEnvironment() == nil {
                throw .usage(
                    "--notify needs $NOTIFY_SOCKET, which systemd sets for Type=notify units; run without --notify outside systemd"
                )
            }
            let path = p.one("config")!
            let loaded: Config
            do { loaded = try loadConfig(path: path) } catch { throw fail("\(error)") }
            Runtime.bootstrapLogging(loaded.global.log)
            let code = Runtime(configPath: path, config: loaded).run()
            if code != 0 { throw .status(code) }
        }
        return c
    }

    static var check: Command {
        let c = Command(
            "check", "Validate a configuration and print what it would run. Exit status 0 when valid, 1 otherwise.")
        var config = configOpt
        config.required = true
        c.options = [config]
        c.run = { (p: Parsed) throws(CLIExit) in
            do {
                let loaded = try loadConfig(path: p.one("config")!)
                let inUse = try checkBinds(loaded)
                for w in loaded.warnings + inUse { writeStderr("ballast: warning: \(w)") }
                print(loaded.summary, terminator: "")
                print("Configuration file is valid")
            } catch {
                throw fail("\(error)")
            }
        }
        return c
    }

    static var ctl: Command {
        let c = Command(
            "ctl",
            "Send a runtime API command (HAProxy's stats socket language) and print the reply; with no command, an interactive prompt."
        )
        c.discussion = """
            Examples:
              ballast ctl --socket /run/ballast/admin.sock show stat
              ballast ctl -c /etc/ballast/ballast.yaml set server redis/r1 state drain
              ballast ctl --socket 127.0.0.1:9999          (interactive, with history)
            """
        c.options = [
            Opt(
                long: "socket", value: "socket",
                help: socketHelp
                    + " Repeat it (optionally NAME=SOCKET) to run the command on every node of a pair. Default: the highest-level socket of --config, else /run/ballast/admin.sock.",
                repeatable: true),
            Opt(long: "config", short: "c", value: "config", help: "Take the socket from this configuration file."),
        ]
        c.positionals = [Positional(name: "command", help: "The command, such as: show info", rest: true)]
        c.run = { (p: Parsed) throws(CLIExit) in
            let sockets = p.all("socket")
            let command = p.positionals
            if sockets.count > 1 {
                if command.isEmpty {
                    throw .usage(
                        "with several --socket, give the command to run on each (the interactive prompt takes one node)"
                    )
                }
                let failed = Ctl.many(sockets, command: command.joined(separator: " "))
                if !failed.isEmpty {
                    throw fail("\(failed.count) of \(sockets.count) nodes failed: \(failed.joined(separator: ", "))")
                }
                return
            }
            let target: String
            do { target = try statsSocket(sockets.first, config: p.one("config")) } catch { throw fail("\(error)") }
            if let error = Ctl.main(target: target, command: command) { throw fail(error) }
        }
        return c
    }

    static var health: Command {
        let c = Command(
            "health",
            "Exit 0 when the running Ballast answers and every worker is alive (for keepalived's track_script); else exit 1 with why."
        )
        c.discussion = """
            Prints one line. Examples:
              ballast health --socket /run/ballast/admin.sock
              ballast health -c /etc/ballast/ballast.yaml --service redis-rw
            """
        let timeout = Opt(
            long: "timeout", value: "timeout", help: "Give up after this many milliseconds.", defaultText: "500")
        c.options = [
            Opt(
                long: "socket", value: "socket",
                help: socketHelp + " Default: the highest-level socket of --config, else /run/ballast/admin.sock."),
            Opt(long: "config", short: "c", value: "config", help: "Take the socket from this configuration file."),
            Opt(
                long: "service", value: "service",
                help: "Also fail when this service has no usable server (repeatable).",
                repeatable: true),
            timeout,
        ]
        c.run = { (p: Parsed) throws(CLIExit) in
            let ms = try p.int(timeout, default: 500)
            guard (1...60_000).contains(ms) else { throw .usage("--timeout must be between 1 and 60000 ms") }
            let target: String
            do {
                target = try statsSocket(p.one("socket"), config: p.one("config"))
            } catch {
                print("fail: \(error)")
                throw .status(1)
            }
            let outcome = Health.check(target: target, services: p.all("service"), timeoutMs: ms)
            print(outcome.ok ? outcome.line : "fail: \(outcome.line)")
            if !outcome.ok { throw .status(1) }
        }
        return c
    }

    static var nft: Command {
        let c = Command("nft", "nat and dsr mode's nftables ruleset.")
        let show = Command(
            "show",
            "Print the ruleset Ballast owns (tables ip/ip6 ballast for nat mode, netdev ballast for dsr mode) in nft syntax: live from a running Ballast through its stats socket, or what a config would program with every server up."
        )
        show.options = [
            Opt(
                long: "socket", value: "socket",
                help: "Ask the running Ballast on this stats socket (Unix path or loopback ip:port)."),
            Opt(long: "config", short: "c", value: "config", help: "Render from this configuration file instead."),
        ]
        show.run = { (p: Parsed) throws(CLIExit) in
            let socket = p.one("socket")
            let config = p.one("config")
            if (socket == nil) == (config == nil) { throw .usage("give --socket (live) or -c FILE (from a config)") }
            if let socket {
                if let error = Ctl.main(target: socket, command: ["show", "nft"]) { throw fail(error) }
                return
            }
            do {
                print(NatRendering.render(try loadConfig(path: config!)), terminator: "")
            } catch {
                throw fail("\(error)")
            }
        }
        c.subcommands = [show]
        return c
    }

    static var debug: Command {
        let c = Command("debug", "Inspect Ballast's deterministic internals.")
        c.hidden = true
        let maglev = Command(
            "maglev",
            "Build the Maglev table `balance: source` uses for these servers and print its digest and slot counts.")
        let size = Opt(
            long: "size", value: "size", help: "Table size (prime).", defaultText: "\(MaglevTable.defaultSize)")
        maglev.options = [size]
        maglev.positionals = [
            Positional(name: "servers", help: "Servers as NAME:WEIGHT, in config order.", many: true, required: true)
        ]
        maglev.run = { (p: Parsed) throws(CLIExit) in
            let n = try p.int(size, default: MaglevTable.defaultSize)
            guard MaglevTable.isPrime(n) else { throw .usage("--size must be prime") }
            var names: [String] = []
            var weights: [Int] = []
            for s in p.positionals {
                let parts = s.split(separator: ":")
                guard parts.count == 2, let w = Int(parts[1]) else { throw .usage("'\(s)' is not NAME:WEIGHT") }
                names.append(String(parts[0]))
                weights.append(w)
            }
            let table = MaglevTable(names: names, weights: weights, size: n)
            print("size \(n) digest \(String(table.digest, radix: 16))")
            var counts = [Int](repeating: 0, count: names.count)
            for e in table.entries where e >= 0 { counts[Int(e)] += 1 }
            for (name, k) in zip(names, counts) { print("\(name) \(k)") }
        }
        c.subcommands = [maglev]
        return c
    }
}

struct SocketChoiceError: Error, CustomStringConvertible {
    var description: String
}

/// The stats socket a client command talks to: `--socket` as given, else the highest-level
/// socket of `--config`, else the packaged default.
func statsSocket(_ socket: String?, config: String?) throws -> String {
    if let socket { return socket }
    guard let path = config else { return "/run/ballast/admin.sock" }
    let c: Config
    do { c = try loadConfig(path: path) } catch { throw SocketChoiceError(description: "\(error)") }
    guard let s = Ctl.socketFromConfig(c) else {
        throw SocketChoiceError(description: "\(path) has no global.stats socket")
    }
    return s
}
