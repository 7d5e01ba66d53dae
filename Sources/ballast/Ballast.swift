import ArgumentParser
import BallastCore
import BallastRuntime

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

@main
struct Ballast: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ballast",
        abstract: "A Layer-4 TCP load balancer for Linux.",
        version: "ballast \(BallastVersion.string) (\(BallastVersion.build))",
        subcommands: [Run.self, Check.self, CtlCommand.self, HealthCommand.self, Nft.self, Debug.self]
    )
}

struct ConfigOptions: ParsableArguments {
    @Option(name: [.short, .customLong("config")], help: "The YAML configuration file.")
    var config: String
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run Ballast in the foreground. SIGHUP reloads the config; SIGTERM or SIGINT stops gracefully.")

    @OptionGroup var options: ConfigOptions

    @Flag(help: "Require systemd's notify protocol (Type=notify): fail at once when $NOTIFY_SOCKET is unset.")
    var notify = false

    func validate() throws {
        if notify && SystemdNotifier.fromProcessEnvironment() == nil {
            throw ValidationError(
                "--notify needs $NOTIFY_SOCKET, which systemd sets for Type=notify units; run without --notify outside systemd"
            )
        }
    }

    func run() throws {
        let config: Config
        do {
            config = try loadConfig(path: options.config)
        } catch {
            writeStderr("ballast: \(error)")
            throw ExitCode(1)
        }
        Runtime.bootstrapLogging(config.global.log)
        let code = Runtime(configPath: options.config, config: config).run()
        if code != 0 { throw ExitCode(code) }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate a configuration and print what it would run. Exit status 0 when valid, 1 otherwise.")

    @OptionGroup var options: ConfigOptions

    func run() throws {
        do {
            let config = try loadConfig(path: options.config)
            let inUse = try checkBinds(config)
            for w in config.warnings + inUse { writeStderr("ballast: warning: \(w)") }
            print(config.summary, terminator: "")
            print("Configuration file is valid")
        } catch {
            writeStderr("ballast: \(error)")
            throw ExitCode(1)
        }
    }
}

struct CtlCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ctl",
        abstract:
            "Send a runtime API command (HAProxy's stats socket language) and print the reply; with no command, an interactive prompt.",
        discussion: """
            Examples:
              ballast ctl --socket /run/ballast/admin.sock show stat
              ballast ctl -c /etc/ballast/ballast.yaml set server redis/r1 state drain
              ballast ctl --socket 127.0.0.1:9999          (interactive, with history)
            """)

    @Option(
        help:
            "The stats socket: a Unix socket path or a loopback ip:port. Repeat it (optionally NAME=SOCKET) to run the command on every node of a pair. Default: the highest-level socket of --config, else /run/ballast/admin.sock."
    )
    var socket: [String] = []

    @Option(name: [.short, .customLong("config")], help: "Take the socket from this configuration file.")
    var config: String?

    @Argument(parsing: .captureForPassthrough, help: "The command, such as: show info")
    var command: [String] = []

    func validate() throws {
        if socket.count > 1 && command.isEmpty {
            throw ValidationError(
                "with several --socket, give the command to run on each (the interactive prompt takes one node)")
        }
    }

    func run() throws {
        if socket.count > 1 {
            let failed = Ctl.many(socket, command: command.joined(separator: " "))
            if !failed.isEmpty {
                writeStderr(
                    "ballast: \(failed.count) of \(socket.count) nodes failed: \(failed.joined(separator: ", "))")
                throw ExitCode(1)
            }
            return
        }
        let target: String
        do {
            target = try statsSocket(socket.first, config: config)
        } catch {
            writeStderr("ballast: \(error)")
            throw ExitCode(1)
        }
        if let error = Ctl.main(target: target, command: command) {
            writeStderr("ballast: \(error)")
            throw ExitCode(1)
        }
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

struct HealthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "health",
        abstract:
            "Exit 0 when the running Ballast answers and every worker is alive (for keepalived's track_script); else exit 1 with why.",
        discussion: """
            Prints one line. Examples:
              ballast health --socket /run/ballast/admin.sock
              ballast health -c /etc/ballast/ballast.yaml --service redis-rw
            """)

    @Option(
        help:
            "The stats socket: a Unix socket path or a loopback ip:port. Default: the highest-level socket of --config, else /run/ballast/admin.sock."
    )
    var socket: String?

    @Option(name: [.short, .customLong("config")], help: "Take the socket from this configuration file.")
    var config: String?

    @Option(name: .customLong("service"), help: "Also fail when this service has no usable server (repeatable).")
    var services: [String] = []

    @Option(help: "Give up after this many milliseconds.")
    var timeout: Int = 500

    func validate() throws {
        guard (1...60_000).contains(timeout) else { throw ValidationError("--timeout must be between 1 and 60000 ms") }
    }

    func run() throws {
        let target: String
        do {
            target = try statsSocket(socket, config: config)
        } catch {
            print("fail: \(error)")
            throw ExitCode(1)
        }
        let outcome = Health.check(target: target, services: services, timeoutMs: timeout)
        print(outcome.ok ? outcome.line : "fail: \(outcome.line)")
        if !outcome.ok { throw ExitCode(1) }
    }
}

struct Nft: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "nat and dsr mode's nftables ruleset.", subcommands: [Show.self])

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Print the ruleset Ballast owns (tables ip/ip6 ballast for nat mode, netdev ballast for dsr mode) in nft syntax: live from a running Ballast through its stats socket, or what a config would program with every server up."
        )

        @Option(help: "Ask the running Ballast on this stats socket (Unix path or loopback ip:port).")
        var socket: String?

        @Option(name: [.short, .customLong("config")], help: "Render from this configuration file instead.")
        var config: String?

        func validate() throws {
            if (socket == nil) == (config == nil) {
                throw ValidationError("give --socket (live) or -c FILE (from a config)")
            }
        }

        func run() throws {
            if let socket {
                if let error = Ctl.main(target: socket, command: ["show", "nft"]) {
                    writeStderr("ballast: \(error)")
                    throw ExitCode(1)
                }
                return
            }
            do {
                let c = try loadConfig(path: config!)
                print(NatRendering.render(c), terminator: "")
            } catch {
                writeStderr("ballast: \(error)")
                throw ExitCode(1)
            }
        }
    }
}

struct Debug: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect Ballast's deterministic internals.", shouldDisplay: false, subcommands: [Maglev.self])

    struct Maglev: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Build the Maglev table `balance: source` uses for these servers and print its digest and slot counts.")

        @Option(help: "Table size (prime).") var size = MaglevTable.defaultSize
        @Argument(help: "Servers as NAME:WEIGHT, in config order.") var servers: [String]

        func validate() throws {
            guard MaglevTable.isPrime(size) else { throw ValidationError("--size must be prime") }
            for s in servers where s.split(separator: ":").count != 2 || Int(s.split(separator: ":")[1]) == nil {
                throw ValidationError("'\(s)' is not NAME:WEIGHT")
            }
        }

        func run() {
            let names = servers.map { String($0.split(separator: ":")[0]) }
            let weights = servers.map { Int($0.split(separator: ":")[1])! }
            let table = MaglevTable(names: names, weights: weights, size: size)
            print("size \(size) digest \(String(table.digest, radix: 16))")
            var counts = [Int](repeating: 0, count: names.count)
            for e in table.entries where e >= 0 { counts[Int(e)] += 1 }
            for (n, c) in zip(names, counts) { print("\(n) \(c)") }
        }
    }
}
