import BallastCore
import Testing

@testable import BallastRuntime

/// The runtime API's parser without a running Ballast: splitting lines, resolving commands
/// against the command table, levels, argument counts, the per-line limit.
@Suite struct CLIParserTests {
    @Test("split: ; separates commands, spaces and tabs words, a backslash escapes the next character")
    func split() {
        #expect(CLI.split("show stat") == [["show", "stat"]])
        #expect(CLI.split("show  stat;show info\ttyped") == [["show", "stat"], ["show", "info", "typed"]])
        #expect(CLI.split("a\\;b c\\ d") == [["a;b", "c d"]])
        #expect(CLI.split("") == [[]])
        #expect(CLI.split(";") == [[], []])
        #expect(CLI.split("x\\") == [["x"]])
    }

    @Test("every command in the table resolves to itself at admin level, with its arguments")
    func everyCommand() throws {
        for c in CLI.commands {
            let args = Array(repeating: "a", count: c.maxArgs ?? 2)
            switch CLI.resolve(c.words + args, .admin) {
            case .failure(let e): Issue.record("\(c.words): \(e.message)")
            case .success(let (cmd, got)):
                #expect(cmd?.words == c.words)
                #expect(got == args)
            }
        }
        // The longest match wins: `show servers state` is not `show` + arguments.
        if case .success(let (cmd, args)) = CLI.resolve(["show", "servers", "state", "svc"], .admin) {
            #expect(cmd?.words == ["show", "servers", "state"] && args == ["svc"])
        } else {
            Issue.record("show servers state did not resolve")
        }
    }

    @Test("levels: a command above the connection's level is refused; help lists only what the level allows")
    func levels() {
        for c in CLI.commands {
            for level in [CLILevel.user, .operator, .admin] {
                let r = CLI.resolve(c.words + (c.maxArgs == 0 ? [] : ["x"]), level)
                if c.level > level {
                    if case .failure(let e) = r {
                        #expect(e.message == "Permission denied\n\n")
                    } else {
                        Issue.record("\(c.words) allowed at \(level)")
                    }
                } else if case .failure(let e) = r {
                    Issue.record("\(c.words) refused at \(level): \(e.message)")
                }
            }
        }
        let help = CLI.helpText(level: .user)
        #expect(help.contains("show stat") && !help.contains("set server") && help.contains("quit"))
    }

    @Test("bad lines: unknown commands get the closest ones, extra words are named, 65 commands on a line are refused")
    func badLines() {
        if case .failure(let e) = CLI.resolve(["show", "stats"], .admin) {
            #expect(
                e.message.hasPrefix(
                    "Unknown command, but maybe one of the following ones is a better match:\n  show stat"))
        } else {
            Issue.record("show stats resolved")
        }
        if case .failure(let e) = CLI.resolve(["show", "version", "now"], .admin) {
            #expect(e.message == "Unexpected argument 'now'. Usage: show version\n\n")
        } else {
            Issue.record("extra word accepted")
        }
        if case .success(let (cmd, _)) = CLI.resolve(["help", "set"], .user) {
            #expect(cmd == nil)
        } else {
            Issue.record("help refused")
        }
        let line64 = Array(repeating: "show info", count: 64).joined(separator: ";")
        let line65 = line64 + ";show info"
        #expect((try? CLI.commands(of: line64).get().count) == 64)
        if case .failure(let e) = CLI.commands(of: line65) {
            #expect(e.message == "Too many commands on one line (65, at most 64).")
        } else {
            Issue.record("65 accepted")
        }
    }
}
