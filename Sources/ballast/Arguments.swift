import BallastRuntime

/// Ballast's command line, read here rather than by a library: the subcommands, their options
/// and help, the usage errors (exit status 64, as with sysexits' EX_USAGE) and `--version`.
/// Options are `--name VALUE`, `--name=VALUE`, `-c VALUE` or `-cVALUE`; `--` ends them.

/// An option: a flag when `value` is nil, else it takes a value (named `value` in help).
struct Opt {
    var long: String
    var short: Character? = nil
    var value: String? = nil
    var help: String
    var repeatable = false
    var required = false
    var defaultText: String? = nil
}

/// A positional argument. `rest` takes every remaining word, options included (a runtime API
/// command such as `show stat -1 4 -1` is passed on as written).
struct Positional {
    var name: String
    var help: String
    var many = false
    var required = false
    var rest = false
}

/// What a command line said, for one command.
struct Parsed {
    var values: [String: [String]] = [:]
    var positionals: [String] = []

    func one(_ long: String) -> String? { values[long]?.last }
    func all(_ long: String) -> [String] { values[long] ?? [] }
    func flag(_ long: String) -> Bool { values[long] != nil }

    /// An option's value as a whole number, or a usage error naming it.
    func int(_ opt: Opt, default d: Int) throws(CLIExit) -> Int {
        guard let text = one(opt.long) else { return d }
        guard let n = Int(text) else {
            throw .usage("The value '\(text)' is invalid for '--\(opt.long) <\(opt.value ?? opt.long)>'")
        }
        return n
    }
}

/// How a command ends other than normally: an exit status, or a usage error (exit 64, with the
/// command's usage line).
enum CLIExit: Error {
    case status(Int32)
    case usage(String)
}

final class Command {
    let name: String
    let abstract: String
    var discussion = ""
    var hidden = false
    var options: [Opt] = []
    var positionals: [Positional] = []
    var subcommands: [Command] = []
    var run: ((Parsed) throws(CLIExit) -> Void)? = nil

    init(_ name: String, _ abstract: String) {
        self.name = name
        self.abstract = abstract
    }

    static let helpOpt = Opt(long: "help", short: "h", help: "Show help information.")
    static let versionOpt = Opt(long: "version", help: "Show the version.")

    func usage(_ path: [String]) -> String {
        var words = path
        if !subcommands.isEmpty && run == nil { return (words + ["<subcommand>"]).joined(separator: " ") }
        for o in options {
            var w = "--\(o.long)" + (o.value.map { " <\($0)>" } ?? "")
            if o.repeatable { w += " ..." }
            words.append(o.required ? w : "[\(w)]")
        }
        for p in positionals {
            let w = "<\(p.name)>" + (p.many || p.rest ? " ..." : "")
            words.append(p.required ? w : "[\(w)]")
        }
        return words.joined(separator: " ")
    }

    func help(_ path: [String]) -> String {
        var out = "OVERVIEW: " + wrap(abstract, width: 80, indent: 0, first: 10) + "\n\n"
        if !discussion.isEmpty { out += discussion + "\n\n" }
        out += "USAGE: \(usage(path))\n\n"
        if !positionals.isEmpty {
            out += "ARGUMENTS:\n"
            for p in positionals { out += row("<\(p.name)>", p.help) }
            out += "\n"
        }
        out += "OPTIONS:\n"
        for o in options {
            let names = (o.short.map { "-\($0), " } ?? "") + "--\(o.long)" + (o.value.map { " <\($0)>" } ?? "")
            out += row(names, o.help + (o.defaultText.map { " (default: \($0))" } ?? ""))
        }
        out += row("--version", Self.versionOpt.help) + row("-h, --help", Self.helpOpt.help)
        let shown = subcommands.filter { !$0.hidden }
        if !shown.isEmpty {
            out += "\nSUBCOMMANDS:\n"
            for s in shown { out += row(s.name, s.abstract) }
            out +=
                "\n  See '\((["ballast", "help"] + path.dropFirst() + ["<subcommand>"]).joined(separator: " "))' for detailed help.\n"
        }
        return out
    }

    private func row(_ left: String, _ text: String) -> String {
        let pad = 26
        let head = "  " + left
        if head.count >= pad - 1 {
            return head + "\n" + String(repeating: " ", count: pad) + wrap(text, width: 80, indent: pad, first: pad)
                + "\n"
        }
        return head + String(repeating: " ", count: pad - head.count) + wrap(text, width: 80, indent: pad, first: pad)
            + "\n"
    }

    /// Words of `text` in lines of at most `width` columns; lines after the first start at
    /// `indent`, the first is `first` columns in already.
    private func wrap(_ text: String, width: Int, indent: Int, first: Int) -> String {
        var out = ""
        var col = first
        var lineEmpty = true
        for word in text.split(separator: " ", omittingEmptySubsequences: true) {
            if !lineEmpty && col + 1 + word.count > width {
                out += "\n" + String(repeating: " ", count: indent)
                col = indent
                lineEmpty = true
            } else if !lineEmpty {
                out += " "
                col += 1
            }
            out += word
            col += word.count
            lineEmpty = false
        }
        return out
    }

    /// Reads `args` (without the program name) for this command and runs what they name.
    func main(_ args: [String], path: [String], version: String) -> Int32 {
        var path = path
        var cmd = self
        var rest = args[...]
        // `ballast help [SUB…]`: the help of the command named.
        if rest.first == "help" {
            rest = rest.dropFirst()
            while let w = rest.first, let sub = cmd.subcommands.first(where: { $0.name == w }) {
                cmd = sub
                path.append(w)
                rest = rest.dropFirst()
            }
            print(cmd.help(path), terminator: "")
            return 0
        }
        while let w = rest.first, let sub = cmd.subcommands.first(where: { $0.name == w }) {
            cmd = sub
            path.append(w)
            rest = rest.dropFirst()
        }
        do throws(CLIExit) {
            guard let parsed = try cmd.parse(rest, path: path, version: version) else { return 0 }
            guard let run = cmd.run else {
                print(cmd.help(path), terminator: "")
                return 0
            }
            try run(parsed)
            return 0
        } catch {
            switch error {
            case .status(let code): return code
            case .usage(let message):
                writeStderr("Error: \(message)")
                writeStderr("Usage: \(cmd.usage(path))")
                writeStderr("  See '\(path.joined(separator: " ")) --help' for more information.")
                return 64
            }
        }
    }

    /// The options and arguments of one command; nil when help or the version was printed.
    private func parse(_ args: ArraySlice<String>, path: [String], version: String) throws(CLIExit) -> Parsed? {
        var parsed = Parsed()
        var words = args
        var optionsOver = false
        func take(_ o: Opt, inline: String?) throws(CLIExit) {
            if o.value == nil {
                if inline != nil { throw .usage("The option '--\(o.long)' takes no value") }
                parsed.values[o.long, default: []].append("")
                return
            }
            let v: String
            if let inline {
                v = inline
            } else if let next = words.first, !next.hasPrefix("--") {
                v = next
                words = words.dropFirst()
            } else {
                throw .usage("Missing value for '--\(o.long) <\(o.value!)>'")
            }
            if !o.repeatable && parsed.values[o.long] != nil {
                throw .usage("The option '--\(o.long)' was given more than once")
            }
            parsed.values[o.long, default: []].append(v)
        }
        while let w = words.first {
            words = words.dropFirst()
            if !optionsOver && w == "--" {
                optionsOver = true
                continue
            }
            if !optionsOver && w.hasPrefix("-") && w.count > 1 {
                if w == "--help" || w == "-h" {
                    print(help(path), terminator: "")
                    return nil
                }
                if w == "--version" {
                    print(version)
                    return nil
                }
                if w.hasPrefix("--") {
                    let body = w.dropFirst(2)
                    let name = body.split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
                    let inline = body.contains("=") ? String(body.drop { $0 != "=" }.dropFirst()) : nil
                    guard let o = options.first(where: { $0.long == name }) else {
                        throw .usage("Unknown option '\(w)'")
                    }
                    try take(o, inline: inline)
                } else {
                    let letter = w.dropFirst().first!
                    guard let o = options.first(where: { $0.short == letter }) else {
                        throw .usage("Unknown option '\(w)'")
                    }
                    let after = String(w.dropFirst(2))
                    try take(
                        o, inline: after.isEmpty ? nil : (after.hasPrefix("=") ? String(after.dropFirst()) : after))
                }
                continue
            }
            // A positional word.
            if let last = positionals.last, last.rest {
                parsed.positionals.append(w)
                parsed.positionals += words
                break
            }
            let room = positionals.contains { $0.many } ? Int.max : positionals.count
            guard parsed.positionals.count < room else { throw .usage("Unexpected argument '\(w)'") }
            parsed.positionals.append(w)
        }
        for o in options where o.required && parsed.values[o.long] == nil {
            throw .usage("Missing expected argument '--\(o.long) <\(o.value ?? o.long)>'")
        }
        let needed = positionals.filter { $0.required }.count
        if parsed.positionals.count < needed, let p = positionals.first(where: { $0.required }) {
            throw .usage("Missing expected argument '<\(p.name)>\(p.many ? " ..." : "")'")
        }
        return parsed
    }
}
