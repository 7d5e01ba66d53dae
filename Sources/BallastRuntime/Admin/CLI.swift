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

    struct Command {
        var words: [String]
        var usage: String
        var help: String
        var level: CLILevel
        /// Arguments after the words, at most (nil: any number, each checked by the command).
        var maxArgs: Int? = nil
    }

    static let commands: [Command] = [
        Command(words: ["add", "acl"], usage: "add acl <acl> <network>", help: "add a network to a service's allow or deny list (<svc>/allow, <svc>/deny)", level: .admin, maxArgs: 2),
        Command(words: ["clear", "acl"], usage: "clear acl <acl>", help: "empty a service's allow or deny list", level: .admin, maxArgs: 1),
        Command(words: ["clear", "counters"], usage: "clear counters [all]", help: "clear max statistics counters (or all counters)", level: .operator, maxArgs: 1),
        Command(words: ["del", "acl"], usage: "del acl <acl> <network>", help: "remove a network from a service's allow or deny list", level: .admin, maxArgs: 2),
        Command(words: ["disable", "health"], usage: "disable health <bk>/<srv>", help: "disable health checks", level: .admin, maxArgs: 1),
        Command(words: ["disable", "server"], usage: "disable server <bk>/<srv>", help: "disable a server for maintenance (use 'set server' instead)", level: .admin, maxArgs: 1),
        Command(words: ["enable", "health"], usage: "enable health <bk>/<srv>", help: "enable health checks", level: .admin, maxArgs: 1),
        Command(words: ["enable", "server"], usage: "enable server <bk>/<srv>", help: "enable a disabled server (use 'set server' instead)", level: .admin, maxArgs: 1),
        Command(words: ["get", "weight"], usage: "get weight <bk>/<srv>", help: "report a server's current weight", level: .user, maxArgs: 1),
        Command(words: ["operator"], usage: "operator", help: "lower the level of the current CLI session to operator", level: .user, maxArgs: 0),
        Command(words: ["set", "maxconn", "server"], usage: "set maxconn server <bk>/<srv>", help: "change a server's maxconn setting", level: .admin, maxArgs: 2),
        Command(words: ["set", "server"], usage: "set server <bk>/<srv> [opts]", help: "change a server's state, weight or health", level: .admin),
        Command(words: ["set", "weight"], usage: "set weight <bk>/<srv>  (DEPRECATED)", help: "change a server's weight (use 'set server' instead)", level: .admin, maxArgs: 2),
        Command(words: ["show", "acl"], usage: "show acl [<acl>]", help: "the access lists, or the networks of one (<svc>/allow, <svc>/deny or #id)", level: .user, maxArgs: 1),
        Command(words: ["show", "backend"], usage: "show backend", help: "list backends in the current running config", level: .user, maxArgs: 0),
        Command(words: ["show", "cli", "level"], usage: "show cli level", help: "display the level of the current CLI session", level: .user, maxArgs: 0),
        Command(words: ["show", "health"], usage: "show health [<backend>]*", help: "ok, or why not: every worker answered recently, the backends have a usable server", level: .user),
        Command(words: ["show", "info"], usage: "show info [desc|json|typed|float]*", help: "report information about the running process", level: .user),
        Command(words: ["show", "nft"], usage: "show nft", help: "print the nftables ruleset of the nat services, in nft syntax", level: .user, maxArgs: 0),
        Command(words: ["show", "servers", "state"], usage: "show servers state [<backend>]", help: "dump volatile server information (all or for a single backend)", level: .user, maxArgs: 1),
        Command(words: ["show", "sentinel"], usage: "show sentinel", help: "the master each Sentinel names, per service with sentinel:", level: .user, maxArgs: 0),
        Command(words: ["show", "sess"], usage: "show sess [id]", help: "report the list of current sessions or dump this exact session", level: .operator, maxArgs: 1),
        Command(words: ["show", "stat"], usage: "show stat [desc|json|no-maint|typed|up]*", help: "report counters for each proxy and server", level: .user),
        Command(words: ["show", "version"], usage: "show version", help: "show version of the current process", level: .user, maxArgs: 0),
        Command(words: ["shutdown", "session"], usage: "shutdown session [id]", help: "kill a specific session", level: .admin, maxArgs: 1),
        Command(words: ["shutdown", "sessions", "server"], usage: "shutdown sessions server <bk>/<srv>", help: "kill sessions on a server", level: .admin, maxArgs: 1),
        Command(words: ["user"], usage: "user", help: "lower the level of the current CLI session to user", level: .user, maxArgs: 0),
    ]

    static let tail: [(String, String)] = [
        ("help [<command>]", "list matching or all commands"), ("prompt", "toggle interactive mode with prompt"), ("quit", "disconnect"),
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
            return .failure(CLIError("Too many commands on one line (\(commands.count), at most \(maxCommandsPerLine))."))
        }
        return .success(commands)
    }

    /// Runs one request line, appending the reply to `out`.
    func run(line: String, session: inout CLISession, into out: inout [UInt8]) {
        switch CLI.commands(of: line) {
        case .failure(let e): out += (e.message + "\n\n").utf8
        case .success(let commands):
            for words in commands {
                if session.closeAfter { break }
                run(words, session: &session, into: &out)
            }
        }
    }

    /// Runs one command, appending its reply (and the prompt, in interactive mode) to `out`, the
    /// connection's output buffer: a large `show stat` is written there directly, never copied.
    func run(_ words: [String], session: inout CLISession, into out: inout [UInt8]) {
        let wasPrompt = session.prompt
        if words.first == "show" && words.dropFirst().first == "stat" && session.level >= .user {
            showStat(Array(words.dropFirst(2)), into: &out)
        } else {
            var reply = execute(words, &session)
            reply.withUTF8 { out.append(contentsOf: $0) }
        }
        if session.prompt && (wasPrompt || words == ["prompt"]) && !session.closeAfter { out += "> ".utf8 }
    }

    func execute(_ w: [String], _ session: inout CLISession) -> String {
        guard let first = w.first else {
            return "Unknown command. Please enter one of the following commands only:\n" + CLI.helpText(level: session.level) + "\n"
        }
        switch first {
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
        case "help":
            return "The following commands are valid at this level:\n" + CLI.helpText(level: session.level, matching: Array(w.dropFirst())) + "\n"
        default:
            break
        }
        guard let cmd = CLI.commands.filter({ w.starts(with: $0.words) }).max(by: { $0.words.count < $1.words.count }) else {
            return unknown(w, session.level)
        }
        if cmd.level > session.level { return "Permission denied\n\n" }
        let args = Array(w.dropFirst(cmd.words.count))
        if let max = cmd.maxArgs, args.count > max {
            return "Unexpected argument '\(args[max])'. Usage: \(cmd.usage)\n\n"
        }
        switch cmd.words.joined(separator: " ") {
        case "operator", "user":
            let wanted: CLILevel = first == "user" ? .user : .operator
            if wanted > session.level { return "Permission denied\n\n" }
            session.level = wanted
            return "\n"
        case "show nft": return (ctx.nat?.render() ?? "") + "\n"
        case "show cli level": return "\(session.level.rawValue)\n\n"
        case "show version": return "\(BallastVersion.string)\n\n"
        case "show backend": return "# name\n" + ctx.table.services.map { $0.name + "\n" }.joined() + "\n"
        case "show info": return ShowInfo.render(ctx, typed: args.contains("typed"), json: args.contains("json"))
        case "show servers state":
            if let name = args.first {
                guard let svc = ctx.service(name) else { return "Can't find backend.\n\n" }
                return StateFile.render(ctx.table, checker: ctx.checker, only: svc) + "\n"
            }
            return StateFile.render(ctx.table, checker: ctx.checker) + "\n"
        case "show sess": return showSess(args)
        case "show sentinel": return showSentinel()
        case "show health": return showHealth(args)
        case "get weight":
            switch ctx.lookup(args.first) {
            case .failure(let e): return e.message + "\n\n"
            case .success(let (_, s, _)): return "\(s.weight) (initial \(s.initialWeight.load(ordering: .relaxed)))\n\n"
            }
        case "set weight": return setWeight(args.first, args.dropFirst().first)
        case "set server": return setServer(args)
        case "set maxconn server": return setMaxconn(args)
        case "enable server", "disable server":
            switch ctx.lookup(args.first) {
            case .failure(let e): return e.message + "\n\n"
            case .success(let (svc, s, _)):
                setAdmin(svc, s, first == "enable" ? .ready : .maint)
                return "\n"
            }
        case "enable health", "disable health":
            switch ctx.lookup(args.first) {
            case .failure(let e): return e.message + "\n\n"
            case .success(let (_, s, _)):
                _ = ctx.checker?.setEnabled(s, first == "enable")
                ctx.saveState()
                return "\n"
            }
        case "shutdown sessions server":
            switch ctx.lookup(args.first) {
            case .failure(let e): return e.message + "\n\n"
            case .success(let (_, s, _)):
                for wk in ctx.workers { wk.send(.shutdownSessions(s)) }
                return "\n"
            }
        case "shutdown session": return shutdownSession(args.first)
        case "show acl": return showACL(args.first)
        case "add acl", "del acl", "clear acl": return changeACL(first, args)
        case "clear counters":
            if args.first == "all" {
                guard session.level >= .admin else { return "Permission denied\n\n" }
                clearCounters(all: true)
            } else {
                clearCounters(all: false)
            }
            return "\n"
        default:
            return unknown(w, session.level)
        }
    }

    /// HAProxy's reply to an unknown command: the closest commands, then help/prompt/quit.
    func unknown(_ w: [String], _ level: CLILevel) -> String {
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
            rows = rows.filter { $0.kind != .server || $0[.status].hasPrefix("UP") || $0[.status] == "no check" || $0[.status] == "DRAIN" }
        }
        if a.contains("no-maint") { rows = rows.filter { $0.kind != .server || $0[.status] != "MAINT" } }
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
        guard kind == "allow" || kind == "deny", let k = services.firstIndex(where: { $0.name == name[..<slash] }) else { return nil }
        return (services[k], kind == "deny", 2 * k + (kind == "deny" ? 1 : 0))
    }

    func showACL(_ name: String?) -> String {
        guard let name else {
            var out = "# id (name) description\n"
            for (k, svc) in ctx.table.services.enumerated() where svc.config.mode == .proxy {
                let list = svc.stats.access.list
                out += "\(2 * k) (\(svc.name)/allow) \(list.allow.count) networks; \(list.allow.isEmpty ? "empty: every client is allowed" : "only these are allowed")\n"
                out += "\(2 * k + 1) (\(svc.name)/deny) \(list.deny.count) networks; refused first\n"
            }
            return out + "\n"
        }
        guard let (svc, deny, _) = acl(name) else { return "Unknown ACL identifier. Please use #<id> or <service>/allow, <service>/deny.\n\n" }
        let list = svc.stats.access.list
        return (deny ? list.deny : list.allow).enumerated().map { "0x\(String($0.offset + 1, radix: 16)) \($0.element)\n" }.joined() + "\n"
    }

    /// `add acl`, `del acl`, `clear acl`: the change applies to the next accepted client, and
    /// stays over reloads until the config's lists for that service change.
    func changeACL(_ verb: String, _ args: [String]) -> String {
        guard let name = args.first, let (svc, deny, _) = acl(name) else {
            return "Unknown ACL identifier. Please use #<id> or <service>/allow, <service>/deny.\n\n"
        }
        guard svc.config.mode == .proxy else { return "Access lists are not available in nat mode yet.\n\n" }
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
                guard let n = list.adding(p, deny: deny) else { return "\(p) is already in \(svc.name)/\(deny ? "deny" : "allow").\n\n" }
                if let problem = AccessList.conflict(allow: n.allow, deny: n.deny) { return "\(problem).\n\n" }
                next = n
            } else {
                guard let n = list.removing(p, deny: deny) else { return "Key not found.\n\n" }
                next = n
            }
        }
        access.set(next, limits: svc.config.limits)
        ctx.logger.notice("service \(svc.name): \(verb) acl \(svc.name)/\(deny ? "deny" : "allow")\(args.count > 1 ? " " + args[1] : "") from the runtime API")
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
        guard let id = UInt64(hex, radix: 16), let (worker, index, gen) = SessionID.parse(id), worker < ctx.workers.count else {
            return "No such session (use 'show sess').\n\n"
        }
        let report = SessionReport()
        ctx.workers[worker].send(.shutdownSession(index: index, generation: gen, report))
        _ = report.answered.wait(for: 1, timeoutMs: 1000)
        return report.found.load(ordering: .relaxed) ? "\n" : "No such session (use 'show sess').\n\n"
    }

    // MARK: - Changes

    func setAdmin(_ svc: Service, _ s: Server, _ state: AdminState) {
        let before = s.adminState
        guard before != state else { return }
        s.setAdmin(state, now: monotonicMillis())
        switch state {
        case .maint: ctx.logger.warning("Server \(svc.name)/\(s.name) is going DOWN for maintenance.")
        case .drain: ctx.logger.warning("Server \(svc.name)/\(s.name) enters drain state.")
        case .ready:
            ctx.logger.notice("Server \(svc.name)/\(s.name) is UP/READY (leaving forced \(before == .maint ? "maintenance" : "drain")).")
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
            guard (0...Defaults.maxWeight).contains(v) else { return "Absolute weight can only be between 0 and 256 inclusive.\n\n" }
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
            return "maxconn \(v) is above the process's maxconn (\(ctx.hardMaxconn)); this server could never reach it.\n\n"
        }
        s.maxconnValue.store(v, ordering: .relaxed)
        ServerStateClock.bump()
        return "\n"
    }

    func setServer(_ args: [String]) -> String {
        let svc: Service, s: Server
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
            guard ctx.checker?.view(s)?.type == .agent else { return "agent checks are not enabled on this server.\n\n" }
            switch value {
            case "up": forceHealth(svc, s, up: true)
            case "down": forceHealth(svc, s, up: false)
            default: return "'set server <srv> agent' expects 'up' or 'down'.\n\n"
            }
            return "\n"
        case "addr", "fqdn", "port", "check-addr", "check-port", "agent-addr", "agent-port", "agent-send", "ssl":
            return "Ballast does not change '\(args[1])' at run time: edit the config and reload (the server keeps its counters).\n\n"
        default:
            return usage
        }
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
                out += "  sentinel \(s.address): \(s.answer), events \(s.subscribed ? "subscribed" : "not subscribed")\n"
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
