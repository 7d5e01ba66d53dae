import BallastCore
import BallastHealth
import BallastProxy

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// One runtime API conversation's state: its level (which `operator`/`user` only lower) and
/// whether it is interactive.
struct CLISession {
    var level: CLILevel
    var prompt = false
    /// Set by `quit`, or by `prompt` turning interactive mode off: close after this line.
    var closeAfter = false
}

/// HAProxy's stats socket language: the same words, replies and error texts, for the commands
/// that mean something to an L4 balancer.
struct CLI {
    let ctx: AdminContext

    /// What a command does with its arguments: a text reply, or (`show stat`) bytes written
    /// straight into the connection's output buffer.
    enum Handler {
        case text(@Sendable (CLI, [String], inout CLISession) -> String)
        case stream(@Sendable (CLI, [String], inout [UInt8]) -> Void)
    }

    /// One row of the command table: its words, its help, the level it needs, how many arguments
    /// it takes, and what it does. Help, permission checks, argument counts and dispatch all
    /// read this one table.
    struct Command: Sendable {
        var words: [String]
        var usage: String
        var help: String
        var level: CLILevel
        /// Arguments after the words, at most (nil: any number, each checked by the command).
        var maxArgs: Int? = nil
        var handler: Handler

        init(
            _ words: [String], _ usage: String, _ help: String, _ level: CLILevel, maxArgs: Int? = nil,
            _ run: @escaping @Sendable (CLI, [String], inout CLISession) -> String
        ) {
            self.words = words
            self.usage = usage
            self.help = help
            self.level = level
            self.maxArgs = maxArgs
            handler = .text(run)
        }

        init(
            _ words: [String], _ usage: String, _ help: String, _ level: CLILevel,
            stream: @escaping @Sendable (CLI, [String], inout [UInt8]) -> Void
        ) {
            self.words = words
            self.usage = usage
            self.help = help
            self.level = level
            handler = .stream(stream)
        }
    }

    static let commands: [Command] = [
        Command(
            ["add", "acl"], "add acl <acl> <network>",
            "add a network to a service's allow or deny list (<svc>/allow, <svc>/deny)", .admin, maxArgs: 2
        ) { cli, a, _ in cli.changeACL("add", a) },
        Command(
            ["add", "server"], "add server <bk>/<srv> <addr>:<port> [weight N] [backup] [maxconn N]",
            "create a new server (in maintenance: 'enable server' puts it in service)", .admin
        ) { cli, a, _ in
            cli.addServer(a)
        },
        Command(["clear", "acl"], "clear acl <acl>", "empty a service's allow or deny list", .admin, maxArgs: 1) {
            cli, a, _ in cli.changeACL("clear", a)
        },
        Command(
            ["clear", "counters"], "clear counters [all]", "clear max statistics counters (or all counters)", .operator,
            maxArgs: 1
        ) { cli, a, session in
            if a.first == "all" && session.level < .admin { return "Permission denied\n\n" }
            cli.clearCounters(all: a.first == "all")
            return "\n"
        },
        Command(
            ["del", "acl"], "del acl <acl> <network>", "remove a network from a service's allow or deny list", .admin,
            maxArgs: 2
        ) { cli, a, _ in cli.changeACL("del", a) },
        Command(
            ["del", "server"], "del server <bk>/<srv>", "remove a server in maintenance that has no connection", .admin,
            maxArgs: 1
        ) { cli, a, _ in cli.delServer(a.first) },
        Command(["disable", "health"], "disable health <bk>/<srv>", "disable health checks", .admin, maxArgs: 1) {
            cli, a, _ in cli.setHealthCheck(a.first, enabled: false)
        },
        Command(
            ["disable", "server"], "disable server <bk>/<srv>",
            "disable a server for maintenance (use 'set server' instead)", .admin, maxArgs: 1
        ) { cli, a, _ in cli.setAdmin(a.first, .maint) },
        Command(["enable", "health"], "enable health <bk>/<srv>", "enable health checks", .admin, maxArgs: 1) {
            cli, a, _ in cli.setHealthCheck(a.first, enabled: true)
        },
        Command(
            ["enable", "server"], "enable server <bk>/<srv>", "enable a disabled server (use 'set server' instead)",
            .admin, maxArgs: 1
        ) { cli, a, _ in cli.setAdmin(a.first, .ready) },
        Command(["get", "weight"], "get weight <bk>/<srv>", "report a server's current weight", .user, maxArgs: 1) {
            cli, a, _ in
            switch cli.ctx.lookup(a.first) {
            case .failure(let e): return e.message + "\n\n"
            case .success(let (_, s, _)): return "\(s.weight) (initial \(s.initialWeight.load(ordering: .relaxed)))\n\n"
            }
        },
        Command(["operator"], "operator", "lower the level of the current CLI session to operator", .user, maxArgs: 0) {
            _, _, session in CLI.lower(&session, to: .operator)
        },
        Command(
            ["set", "maxconn", "server"], "set maxconn server <bk>/<srv>", "change a server's maxconn setting", .admin,
            maxArgs: 2
        ) { cli, a, _ in cli.setMaxconn(a) },
        Command(["set", "server"], "set server <bk>/<srv> [opts]", "change a server's state, weight or health", .admin)
        { cli, a, _ in cli.setServer(a) },
        Command(
            ["set", "weight"], "set weight <bk>/<srv>  (DEPRECATED)",
            "change a server's weight (use 'set server' instead)", .admin, maxArgs: 2
        ) { cli, a, _ in
            cli.setWeight(a.first, a.dropFirst().first)
        },
        Command(
            ["show", "acl"], "show acl [<acl>]",
            "the access lists, or the networks of one (<svc>/allow, <svc>/deny or #id)", .user, maxArgs: 1
        ) { cli, a, _ in cli.showACL(a.first) },
        Command(["show", "backend"], "show backend", "list backends in the current running config", .user, maxArgs: 0) {
            cli, _, _ in
            "# name\n" + cli.ctx.table.services.map { $0.name + "\n" }.joined() + "\n"
        },
        Command(
            ["show", "cli", "level"], "show cli level", "display the level of the current CLI session", .user,
            maxArgs: 0
        ) { _, _, session in "\(session.level.rawValue)\n\n" },
        Command(
            ["show", "health"], "show health [<backend>]*",
            "ok, or why not: every worker answered recently, the backends have a usable server", .user
        ) { cli, a, _ in cli.showHealth(a) },
        Command(
            ["show", "info"], "show info [desc|json|typed|float]*", "report information about the running process",
            .user
        ) { cli, a, _ in
            ShowInfo.render(cli.ctx, typed: a.contains("typed"), json: a.contains("json"))
        },
        Command(
            ["show", "nft"], "show nft", "print the nftables ruleset of the nat services, in nft syntax", .user,
            maxArgs: 0
        ) { cli, _, _ in (cli.ctx.nat?.render() ?? "") + "\n" },
        Command(
            ["show", "servers", "state"], "show servers state [<backend>]",
            "dump volatile server information (all or for a single backend)", .user, maxArgs: 1
        ) { cli, a, _ in
            cli.showServersState(a.first)
        },
        Command(
            ["show", "sentinel"], "show sentinel", "the master each Sentinel names, per service with sentinel:", .user,
            maxArgs: 0
        ) { cli, _, _ in cli.showSentinel() },
        Command(
            ["show", "sess"], "show sess [id]", "report the list of current sessions or dump this exact session",
            .operator, maxArgs: 1
        ) { cli, a, _ in cli.showSess(a) },
        Command(
            ["show", "stat"], "show stat [desc|json|no-maint|typed|up]*", "report counters for each proxy and server",
            .user, stream: { cli, a, out in cli.showStat(a, into: &out) }),
        Command(["show", "version"], "show version", "show version of the current process", .user, maxArgs: 0) {
            _, _, _ in "\(BallastVersion.string)\n\n"
        },
        Command(["shutdown", "session"], "shutdown session [id]", "kill a specific session", .admin, maxArgs: 1) {
            cli, a, _ in cli.shutdownSession(a.first)
        },
        Command(
            ["shutdown", "sessions", "server"], "shutdown sessions server <bk>/<srv>", "kill sessions on a server",
            .admin, maxArgs: 1
        ) { cli, a, _ in
            switch cli.ctx.lookup(a.first) {
            case .failure(let e): return e.message + "\n\n"
            case .success(let (_, s, _)):
                for wk in cli.ctx.workers { wk.send(.shutdownSessions(s)) }
                return "\n"
            }
        },
        Command(["user"], "user", "lower the level of the current CLI session to user", .user, maxArgs: 0) {
            _, _, session in CLI.lower(&session, to: .user)
        },
    ]

    /// `operator` and `user`: a connection's level only goes down.
    static func lower(_ session: inout CLISession, to wanted: CLILevel) -> String {
        if wanted > session.level { return "Permission denied\n\n" }
        session.level = wanted
        return "\n"
    }

    static let tail: [(String, String)] = [
        ("help [<command>]", "list matching or all commands"), ("prompt", "toggle interactive mode with prompt"),
        ("quit", "disconnect"),
    ]

    static func helpLine(_ usage: String, _ help: String) -> String {
        let pad = usage.count < 40 ? String(repeating: " ", count: 40 - usage.count) : ""
        return "  \(usage)\(pad): \(help)\n"
    }

    static func helpText(level: CLILevel, matching: [String] = []) -> String {
        var out = ""
        for c in commands where c.level <= level {
            if !matching.isEmpty && !zip(matching, c.words).allSatisfy({ $0 == $1 }) { continue }
            out += helpLine(c.usage, c.help)
        }
        for (u, h) in tail { out += helpLine(u, h) }
        return out
    }

    /// Splits a request line into commands at unescaped `;` and each command into words at
    /// spaces; a backslash escapes the next character, as in HAProxy.
    static func split(_ line: String) -> [[String]] {
        var commands: [[String]] = []
        var words: [String] = []
        var word = ""
        var hasWord = false
        var escape = false
        for ch in line {
            if escape {
                word.append(ch)
                hasWord = true
                escape = false
                continue
            }
            switch ch {
            case "\\":
                escape = true
            case ";":
                if hasWord { words.append(word) }
                commands.append(words)
                words = []
                word = ""
                hasWord = false
            case " ", "\t":
                if hasWord { words.append(word) }
                word = ""
                hasWord = false
            default:
                word.append(ch)
                hasWord = true
            }
        }
        if hasWord { words.append(word) }
        commands.append(words)
        return commands
    }

    /// At most this many `;`-separated commands on one request line.
    static let maxCommandsPerLine = 64

    /// The commands of one request line, or the error reply when the line has too many.
    static func commands(of line: String) -> Result<[[String]], CLIError> {
        let commands = split(line)
        if commands.count > maxCommandsPerLine {
            return .failure(
                CLIError("Too many commands on one line (\(commands.count), at most \(maxCommandsPerLine))."))
        }
        return .success(commands)
    }

    /// Runs one command, appending its reply (and the prompt, in interactive mode) to `out`, the
    /// connection's output buffer: a large `show stat` is written there directly, never copied.
    func run(_ words: [String], session: inout CLISession, into out: inout [UInt8]) {
        let wasPrompt = session.prompt
        switch CLI.resolve(words, session.level) {
        case .failure(let e):
            out += e.message.utf8
        case .success(let (cmd, args)):
            switch cmd?.handler {
            case .stream(let write)?:
                write(self, args, &out)
            case .text(let reply)?:
                var r = reply(self, args, &session)
                r.withUTF8 { out.append(contentsOf: $0) }
            case nil:
                var r = builtin(words, &session)
                r.withUTF8 { out.append(contentsOf: $0) }
            }
        }
        if session.prompt && (wasPrompt || words == ["prompt"]) && !session.closeAfter { out += "> ".utf8 }
    }

    /// The command a line names and its arguments (nil for `prompt`, `quit`, `help`), or the
    /// reply that refuses it: unknown, above the connection's level, too many arguments.
    static func resolve(_ w: [String], _ level: CLILevel) -> Result<(Command?, [String]), CLIError> {
        guard let first = w.first else {
            return .failure(
                CLIError(
                    "Unknown command. Please enter one of the following commands only:\n" + CLI.helpText(level: level)
                        + "\n"))
        }
        if ["prompt", "quit", "help"].contains(first) { return .success((nil, [])) }
        guard let cmd = CLI.commands.filter({ w.starts(with: $0.words) }).max(by: { $0.words.count < $1.words.count })
        else {
            return .failure(CLIError(unknown(w, level)))
        }
        if cmd.level > level { return .failure(CLIError("Permission denied\n\n")) }
        let args = Array(w.dropFirst(cmd.words.count))
        if let max = cmd.maxArgs, args.count > max {
            return .failure(CLIError("Unexpected argument '\(args[max])'. Usage: \(cmd.usage)\n\n"))
        }
        return .success((cmd, args))
    }

    /// `prompt`, `quit` and `help`: they act on the conversation, not on Ballast.
    func builtin(_ w: [String], _ session: inout CLISession) -> String {
        switch w.first {
        case "prompt":
            if session.prompt {
                session.prompt = false
                session.closeAfter = true
            } else {
                session.prompt = true
            }
            return "\n"
        case "quit":
            session.closeAfter = true
            return ""
        default:
            return "The following commands are valid at this level:\n"
                + CLI.helpText(level: session.level, matching: Array(w.dropFirst())) + "\n"
        }
    }

    /// HAProxy's reply to an unknown command: the closest commands, then help/prompt/quit.
    static func unknown(_ w: [String], _ level: CLILevel) -> String {
        let text = w.prefix(2).joined(separator: " ")
        let ranked = CLI.commands.filter { $0.level <= level }.map { c -> (Int, Command) in
            (editDistance(text, c.words.prefix(2).joined(separator: " ")), c)
        }.sorted { $0.0 < $1.0 }
        var out = "Unknown command, but maybe one of the following ones is a better match:\n"
        for (_, c) in ranked.prefix(5) { out += CLI.helpLine(c.usage, c.help) }
        for (u, h) in CLI.tail { out += CLI.helpLine(u, h) }
        return out + "\n"
    }

    // MARK: - show stat

    func showStat(_ args: [String], into out: inout [UInt8]) {
        var a = args
        var filter: Service?
        var kinds = -1
        var sid = -1
        let flags: Set<String> = ["typed", "json", "up", "no-maint", "desc"]
        if a.count >= 3, !flags.contains(a[0]), let t = Int(a[1]), let s = Int(a[2]) {
            if a[0] != "-1" {
                guard let svc = ctx.service(Int(a[0]) != nil ? "#\(a[0])" : a[0]) else {
                    out += "No such proxy.\n\n".utf8
                    return
                }
                filter = svc
            }
            kinds = t
            sid = s
            a.removeFirst(3)
        }
        var rows = StatTable.rows(ctx, service: filter, kinds: kinds, sid: sid)
        if a.contains("up") {
            rows = rows.filter {
                $0.kind != .server || $0[.status].hasPrefix("UP") || $0[.status] == "no check" || $0[.status] == "DRAIN"
            }
        }
        if a.contains("no-maint") { rows = rows.filter { $0.kind != .server || !$0[.status].hasPrefix("MAINT") } }
        if a.contains("json") {
            out += (StatTable.json(rows) + "\n").utf8
        } else if a.contains("typed") {
            out += (StatTable.typed(rows) + "\n").utf8
        } else {
            out.reserveCapacity(out.count + StatTable.header.utf8.count + rows.count * 280)
            out += StatTable.header.utf8
            for r in rows { r.csv(into: &out) }
            out.append(10)
        }
    }

    // MARK: - Access lists

    /// Every service has two lists, `#2k <svc>/allow` and `#2k+1 <svc>/deny` (k: config order from 0).
    func acl(_ name: String) -> (Service, deny: Bool, id: Int)? {
        let services = ctx.table.services
        if name.hasPrefix("#"), let id = Int(name.dropFirst()), id >= 0, id / 2 < services.count {
            return (services[id / 2], id % 2 == 1, id)
        }
        guard let slash = name.lastIndex(of: "/") else { return nil }
        let kind = name[name.index(after: slash)...]
        guard kind == "allow" || kind == "deny", let k = services.firstIndex(where: { $0.name == name[..<slash] })
        else { return nil }
        return (services[k], kind == "deny", 2 * k + (kind == "deny" ? 1 : 0))
    }

    func showACL(_ name: String?) -> String {
        guard let name else {
            var out = "# id (name) description\n"
            for (k, svc) in ctx.table.services.enumerated() {
                let list = svc.stats.access.list
                out +=
                    "\(2 * k) (\(svc.name)/allow) \(list.allow.count) networks; \(list.allow.isEmpty ? "empty: every client is allowed" : "only these are allowed")\n"
                out += "\(2 * k + 1) (\(svc.name)/deny) \(list.deny.count) networks; refused first\n"
            }
            return out + "\n"
        }
        guard let (svc, deny, _) = acl(name) else {
            return "Unknown ACL identifier. Please use #<id> or <service>/allow, <service>/deny.\n\n"
        }
        let list = svc.stats.access.list
        return (deny ? list.deny : list.allow).enumerated().map {
            "0x\(String($0.offset + 1, radix: 16)) \($0.element)\n"
        }.joined() + "\n"
    }

    /// `add acl`, `del acl`, `clear acl`: the change applies to the next accepted client, and
    /// stays over reloads until the config's lists for that service change.
    func changeACL(_ verb: String, _ args: [String]) -> String {
        guard let name = args.first, let (svc, deny, _) = acl(name) else {
            return "Unknown ACL identifier. Please use #<id> or <service>/allow, <service>/deny.\n\n"
        }
        let access = svc.stats.access
        let list = access.list
        var next: AccessList
        if verb == "clear" {
            next = deny ? AccessList(allow: list.allow) : AccessList(deny: list.deny)
        } else {
            guard args.count >= 2 else { return "'\(verb) acl' expects an ACL and a network.\n\n" }
            let p: IPPrefix
            do { p = try IPPrefix(parsing: args[1]) } catch { return "\(error).\n\n" }
            if verb == "add" {
                guard let n = list.adding(p, deny: deny) else {
                    return "\(p) is already in \(svc.name)/\(deny ? "deny" : "allow").\n\n"
                }
                if let problem = AccessList.conflict(allow: n.allow, deny: n.deny) { return "\(problem).\n\n" }
                next = n
            } else {
                guard let n = list.removing(p, deny: deny) else { return "Key not found.\n\n" }
                next = n
            }
        }
        access.set(next, limits: svc.config.limits)
        if svc.config.mode.isKernel, let nat = ctx.nat {
            // The kernel's sets follow in one atomic batch; if that fails nothing changed.
            do { try nat.apply(ctx.table) } catch {
                access.set(list, limits: svc.config.limits)
                return "nat mode could not apply the change: \(error)\n\n"
            }
        }
        ctx.logger.notice(
            "service \(svc.name): \(verb) acl \(svc.name)/\(deny ? "deny" : "allow")\(args.count > 1 ? " " + args[1] : "") from the runtime API"
        )
        return "\n"
    }

    // MARK: - Sessions

    func showSess(_ args: [String]) -> String {
        let lines = ctx.askWorkers { .listSessions($0) }.collected
        if let id = args.first {
            let match = lines.filter { $0.hasPrefix(id + ":") }
            return match.isEmpty ? "Session not found.\n\n" : match.joined(separator: "\n") + "\n\n"
        }
        return lines.map { $0 + "\n" }.joined() + "\n"
    }

    func shutdownSession(_ arg: String?) -> String {
        guard let arg else { return "Session pointer expected (use 'show sess').\n\n" }
        let hex = arg.hasPrefix("0x") ? String(arg.dropFirst(2)) : arg
        guard let id = UInt64(hex, radix: 16), let (worker, index, gen) = SessionID.parse(id),
            worker < ctx.workers.count
        else {
            return "No such session (use 'show sess').\n\n"
        }
        let report = SessionReport()
        ctx.workers[worker].send(.shutdownSession(index: index, generation: gen, report))
        _ = report.answered.wait(for: 1, timeoutMs: 1000)
        return report.found.load(ordering: .relaxed) ? "\n" : "No such session (use 'show sess').\n\n"
    }

    // MARK: - Changes

    /// `enable server` / `disable server` (HAProxy's older forms of `set server … state`).
    func setAdmin(_ target: String?, _ state: AdminState) -> String {
        switch ctx.lookup(target) {
        case .failure(let e): return e.message + "\n\n"
        case .success(let (svc, s, _)):
            setAdmin(svc, s, state)
            return "\n"
        }
    }

    func setHealthCheck(_ target: String?, enabled: Bool) -> String {
        switch ctx.lookup(target) {
        case .failure(let e): return e.message + "\n\n"
        case .success(let (_, s, _)):
            _ = ctx.checker?.setEnabled(s, enabled)
            ctx.saveState()
            return "\n"
        }
    }

    func showServersState(_ name: String?) -> String {
        if let name {
            guard let svc = ctx.service(name) else { return "Can't find backend.\n\n" }
            return StateFile.render(ctx.table, checker: ctx.checker, only: svc) + "\n"
        }
        return StateFile.render(ctx.table, checker: ctx.checker) + "\n"
    }

    func setAdmin(_ svc: Service, _ s: Server, _ state: AdminState) {
        let before = s.adminState
        guard before != state else { return }
        s.setAdmin(state, now: monotonicMillis())
        switch state {
        case .maint: ctx.logger.warning("Server \(svc.name)/\(s.name) is going DOWN for maintenance.")
        case .drain: ctx.logger.warning("Server \(svc.name)/\(s.name) enters drain state.")
        case .ready:
            ctx.logger.notice(
                "Server \(svc.name)/\(s.name) is UP/READY (leaving forced \(before == .maint ? "maintenance" : "drain"))."
            )
        }
        ctx.saveState()
    }

    /// `set weight` and `set server … weight`: absolute 0–256, or `N%` of the initial weight.
    func setWeight(_ target: String?, _ value: String?) -> String {
        let s: Server
        switch ctx.lookup(target) {
        case .failure(let e): return e.message + "\n\n"
        case .success(let (_, srv, _)): s = srv
        }
        guard let value, !value.isEmpty else { return "Require <weight> or <weight%>.\n\n" }
        let weight: Int
        if value.hasSuffix("%") {
            guard let pct = Int(value.dropLast()) else { return "Empty weight string empty or preceded by garbage\n" }
            guard pct >= 0 else { return "Relative weight must be positive.\n\n" }
            weight = min(Defaults.maxWeight, s.initialWeight.load(ordering: .relaxed) * pct / 100)
        } else {
            guard let v = Int(value) else { return "Empty weight string empty or preceded by garbage\n" }
            guard (0...Defaults.maxWeight).contains(v) else {
                return "Absolute weight can only be between 0 and 256 inclusive.\n\n"
            }
            weight = v
        }
        s.setWeight(weight, now: monotonicMillis())
        ctx.saveState()
        return "\n"
    }

    func setMaxconn(_ args: [String]) -> String {
        let s: Server
        switch ctx.lookup(args.first) {
        case .failure(let e): return e.message + "\n\n"
        case .success(let (_, srv, _)): s = srv
        }
        guard args.count >= 2 else { return "Require <maxconn>.\n\n" }
        guard let v = Int(args[1]), v >= 0 else { return "maxconn string empty or preceded by garbage\n" }
        guard v <= ctx.hardMaxconn else {
            return
                "maxconn \(v) is above the process's maxconn (\(ctx.hardMaxconn)); this server could never reach it.\n\n"
        }
        s.setMaxconn(v)
        return "\n"
    }

    func setServer(_ args: [String]) -> String {
        let svc: Service
        let s: Server
        switch ctx.lookup(args.first) {
        case .failure(let e): return e.message + "\n\n"
        case .success(let (a, b, _)):
            svc = a
            s = b
        }
        let usage = "usage: set server <backend>/<server> health | state | weight | agent | addr\n\n"
        guard args.count >= 2 else { return usage }
        if args.count > 3 && ["state", "weight", "health", "agent"].contains(args[1]) {
            return "Unexpected argument '\(args[3])'. Usage: set server <bk>/<srv> \(args[1]) <value>\n\n"
        }
        let value = args.count >= 3 ? args[2] : nil
        switch args[1] {
        case "state":
            switch value {
            case "ready": setAdmin(svc, s, .ready)
            case "drain": setAdmin(svc, s, .drain)
            case "maint": setAdmin(svc, s, .maint)
            default: return "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n\n"
            }
            return "\n"
        case "weight":
            return setWeight(args[0], value)
        case "health":
            switch value {
            case "up": forceHealth(svc, s, up: true)
            case "down", "stopping": forceHealth(svc, s, up: false)
            default: return "'set server <srv> health' expects 'up', 'stopping', or 'down'.\n\n"
            }
            return "\n"
        case "agent":
            guard ctx.checker?.view(s)?.type == .agent else {
                return "agent checks are not enabled on this server.\n\n"
            }
            switch value {
            case "up": forceHealth(svc, s, up: true)
            case "down": forceHealth(svc, s, up: false)
            default: return "'set server <srv> agent' expects 'up' or 'down'.\n\n"
            }
            return "\n"
        case "addr":
            guard let value else { return "set server <b>/<s> addr requires an address and optionally a port.\n\n" }
            var port: String?
            if args.count > 3 {
                guard args[3] == "port", args.count == 5 else {
                    return "set server <b>/<s> addr requires an address and optionally a port.\n\n"
                }
                port = args[4]
            }
            return cli(.move(service: svc.name, server: s.name, address: value, port: port))
        case "fqdn", "port", "check-addr", "check-port", "agent-addr", "agent-port", "agent-send", "ssl":
            return
                "Ballast does not change '\(args[1])' at run time: edit the config and reload (the server keeps its counters).\n\n"
        default:
            return usage
        }
    }

    /// Hands a server change to the main thread and returns its answer, as HAProxy 2.6 ends
    /// it (some replies with a blank line, some not).
    func cli(_ change: ServerChange) -> String {
        guard let apply = ctx.changeServers else { return "Servers cannot be changed at run time here.\n" }
        switch apply(change) {
        case .success(let text): return text
        case .failure(let e): return e.message
        }
    }

    /// `add server <bk>/<srv> <addr>:<port> [weight N] [backup] [maxconn N]`, as HAProxy 2.6's.
    func addServer(_ args: [String]) -> String {
        guard let target = args.first, let slash = target.firstIndex(of: "/") else {
            return "Require 'backend/server'.\n"
        }
        let service = String(target[..<slash])
        let name = String(target[target.index(after: slash)...])
        guard args.count >= 2, !name.isEmpty else {
            return "'server' expects <name> and <addr>[:<port>] as arguments.\n\n"
        }
        let text = args[1]
        guard let address = try? SocketAddress(parsing: text) else {
            if HostName.split(text) != nil {
                return
                    "'\(text)': Ballast adds servers by numeric address; a server known by DNS name belongs in the config (address: name:port).\n\n"
            }
            return
                "'server' expects <name> and <addr>:<port> as arguments ('\(text)' is not a numeric address and port).\n\n"
        }
        var added = AddedServer(name: name, address: address)
        var k = 2
        while k < args.count {
            switch args[k] {
            case "backup":
                added.backup = true
                k += 1
            case "weight", "maxconn":
                guard k + 1 < args.count, let v = Int(args[k + 1]) else {
                    return "'\(args[k])' expects an integer argument.\n\n"
                }
                if args[k] == "weight" {
                    guard (0...Defaults.maxWeight).contains(v) else {
                        return "weight of server \(name) is not within 0 and \(Defaults.maxWeight).\n\n"
                    }
                    added.weight = v
                } else {
                    guard v >= 0 else { return "'maxconn' expects a positive integer.\n\n" }
                    added.maxconn = v
                }
                k += 2
            default:
                return "unknown keyword '\(args[k])'.\n\n"
            }
        }
        return cli(.add(service: service, added))
    }

    /// `del server <bk>/<srv>`: only a server in maintenance with no connection, as HAProxy.
    func delServer(_ target: String?) -> String {
        guard let target, let slash = target.firstIndex(of: "/") else { return "Require 'backend/server'.\n" }
        return cli(.delete(service: String(target[..<slash]), server: String(target[target.index(after: slash)...])))
    }

    func forceHealth(_ svc: Service, _ s: Server, up: Bool) {
        if let checker = ctx.checker {
            checker.force(s, up: up, service: svc.name)
        } else if s.setUp(up) {
            ctx.logger.notice("Server \(svc.name)/\(s.name) is \(up ? "UP" : "DOWN") (changed from CLI).")
            ctx.onTransition(svc.name, s, up)
        }
        ctx.saveState()
    }

    func clearCounters(all: Bool) {
        for svc in ctx.table.services {
            svc.stats.clearMax()
            for s in svc.servers { s.clearMax() }
            if all {
                svc.stats.counters.clear()
                svc.stats.downTransitions.store(0, ordering: .relaxed)
                svc.stats.downtimeMs.store(0, ordering: .relaxed)
                svc.stats.access.clearCounters()
                for s in svc.servers {
                    s.counters.clear()
                    s.failedChecks.store(0, ordering: .relaxed)
                    s.downTransitions.store(0, ordering: .relaxed)
                    s.downtimeMs.store(0, ordering: .relaxed)
                }
            }
        }
        ctx.rates.clearMax()
    }

    /// One block per service with `sentinel:`: the agreed master, then each Sentinel's answer.
    func showSentinel() -> String {
        var out = ""
        for v in ctx.checker?.sentinelViews() ?? [] {
            out += "service \(v.service) master \(v.master): \(v.agreed.map { "\($0)" } ?? "none agreed yet")"
            out += v.failover ? " (failover under way)\n" : "\n"
            if let p = v.problem { out += "  problem: \(p)\n" }
            for s in v.sentinels {
                out +=
                    "  sentinel \(s.address): \(s.answer), events \(s.subscribed ? "subscribed" : "not subscribed")\n"
            }
        }
        return out + "\n"
    }

    /// `ballast health`'s question: `ok: …`, or one `fail: …` line per problem. A worker is stuck
    /// when its last answer to the runtime's pings (four a second) is older than a second.
    func showHealth(_ services: [String]) -> String {
        var problems: [String] = []
        if ctx.stopping.load(ordering: .relaxed) { problems.append("Ballast is stopping") }
        let now = monotonicMillis()
        for (k, w) in ctx.workers.enumerated() {
            let age = now - w.lastBeat.load(ordering: .relaxed)
            if age > 1000 { problems.append("worker \(k) has not answered for \(age / 1000).\(age % 1000 / 100) s") }
        }
        for name in services {
            guard let svc = ctx.service(name) else {
                problems.append("no service named '\(name)'")
                continue
            }
            if !svc.servers.contains(where: \.usable) { problems.append("service \(svc.name) has no usable server") }
        }
        if problems.isEmpty {
            let named = services.isEmpty ? "" : "; \(services.joined(separator: ", ")) usable"
            return "ok: \(ctx.workers.count) workers answered within 1 s\(named)\n\n"
        }
        return problems.map { "fail: \($0)\n" }.joined() + "\n"
    }
}
