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
        version: "ballast \(BallastVersion.string)",
        subcommands: [Run.self, Check.self]
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
            try checkBinds(config)
            print(config.summary, terminator: "")
            print("Configuration file is valid")
        } catch {
            writeStderr("ballast: \(error)")
            throw ExitCode(1)
        }
    }
}
