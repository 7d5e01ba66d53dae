import BallastCore
import BallastHealth

/// `/metrics` in the Prometheus text exposition format (version 0.0.4), written here: one
/// `# HELP` and `# TYPE` line per family, then its samples. Values are read when scraped: the
/// workers' per-thread counters are summed here, never pushed from the data path, and each
/// scrape is rendered afresh, so series of servers and services that left the config are gone.
final class MetricsExporter: @unchecked Sendable {
    private let ctx: AdminContext

    /// One family: its samples in the order they were added.
    private struct Family {
        var type: String
        var help: String
        var samples: [UInt8] = []
    }
    private var families: [String: Family] = [:]
    private var order: [String] = []

    init(ctx: AdminContext) { self.ctx = ctx }

    private func sample(_ name: String, _ type: String, _ help: String, _ labels: [(String, String)], _ value: String) {
        if families[name] == nil {
            families[name] = Family(type: type, help: help)
            order.append(name)
        }
        var line = Array(name.utf8)
        if !labels.isEmpty {
            line.append(UInt8(ascii: "{"))
            for (k, (label, v)) in labels.enumerated() {
                if k > 0 { line.append(UInt8(ascii: ",")) }
                line += label.utf8
                line += #"=""#.utf8
                for byte in v.utf8 {
                    switch byte {
                    case UInt8(ascii: "\\"): line += #"\\"#.utf8
                    case UInt8(ascii: "\""): line += #"\""#.utf8
                    case UInt8(ascii: "\n"): line += #"\n"#.utf8
                    default: line.append(byte)
                    }
                }
                line.append(UInt8(ascii: "\""))
            }
            line.append(UInt8(ascii: "}"))
        }
        line.append(UInt8(ascii: " "))
        line += value.utf8
        line.append(UInt8(ascii: "\n"))
        families[name]!.samples += line
    }

    private func counter(_ sub: String, _ name: String, _ help: String, _ labels: [(String, String)], _ value: UInt64) {
        sample("ballast_\(sub)_\(name)_total", "counter", help, labels, String(value))
    }

    private func gauge(
        _ sub: String, _ name: String, _ unit: String = "", _ help: String, _ labels: [(String, String)],
        _ value: Double
    ) {
        sample("ballast_\(sub)_\(name)" + (unit.isEmpty ? "" : "_\(unit)"), "gauge", help, labels, "\(value)")
    }

    /// Same counters under the same names for a service's frontend/backend and for a server.
    private func traffic(_ sub: String, _ labels: [(String, String)], _ c: CounterSlot) {
        counter(sub, "sessions", "Connections handed to a server", labels, c.sessions)
        counter(sub, "bytes_in", "Bytes received from clients", labels, c.bytesIn)
        counter(sub, "bytes_out", "Bytes sent to clients", labels, c.bytesOut)
        counter(sub, "connection_errors", "Failed connects to servers", labels, c.connectErrors)
        counter(sub, "response_errors", "Established connections reset by the server", labels, c.responseErrors)
        counter(sub, "retry_warnings", "Connect retries", labels, c.retries)
        counter(sub, "redispatch_warnings", "Retries moved to another server", labels, c.redispatches)
        counter(sub, "loadbalanced", "Times a server was chosen by the balancing policy", labels, c.picks)
        counter(sub, "client_aborts", "Connections ended by a client reset", labels, c.clientAborts)
        counter(sub, "server_aborts", "Connections ended by a server reset", labels, c.serverAborts)
    }

    func render() -> String {
        let now = monotonicMillis()
        for svc in ctx.table.services {
            let p = [("proxy", svc.name)]
            let st = svc.stats
            let c = st.counters.raw()
            gauge(
                "frontend", "current_sessions", "", "Client connections open", p,
                Double(st.clients.load(ordering: .relaxed)))
            gauge(
                "frontend", "max_sessions", "", "Most client connections open at once", p,
                Double(st.clientsMax.load(ordering: .relaxed)))
            counter("frontend", "connections", "Client connections accepted", p, c.accepted)
            counter(
                "frontend", "request_errors", "Client connections refused for a bad PROXY header", p, c.requestErrors)
            counter(
                "frontend", "denied_connections", "Client connections refused by the access list or a per-client limit",
                p, svc.config.mode.isKernel ? ctx.nat?.refused(service: svc.name) ?? 0 : st.access.totalRefused)
            counter("frontend", "bytes_in", "Bytes received from clients", p, c.bytesIn)
            counter("frontend", "bytes_out", "Bytes sent to clients", p, c.bytesOut)
            traffic("backend", p, c)
            gauge(
                "backend", "current_sessions", "", "Connections with a server or waiting for one", p,
                Double(st.assigned.load(ordering: .relaxed) + st.queued.load(ordering: .relaxed)))
            gauge(
                "backend", "current_queue", "", "Connections waiting for a server below maxconn", p,
                Double(st.queued.load(ordering: .relaxed)))
            gauge("backend", "max_queue", "", "Longest queue seen", p, Double(st.queuedMax.load(ordering: .relaxed)))
            var act = 0
            var bck = 0
            for (j, s) in svc.servers.enumerated() where s.usable {
                if svc.config.servers[j].backup { bck += 1 } else { act += 1 }
            }
            gauge("backend", "active_servers", "", "Usable active servers", p, Double(act))
            gauge("backend", "backup_servers", "", "Usable backup servers", p, Double(bck))
            gauge("backend", "status", "", "1 when some server can take connections", p, act + bck > 0 ? 1 : 0)
            for (j, s) in svc.servers.enumerated() {
                let l = [("proxy", svc.name), ("server", s.name)]
                var sc = s.counters.raw()
                var current = s.active.load(ordering: .relaxed)
                if svc.config.mode.isKernel, let nat = ctx.nat {
                    // nat servers: what the kernel counted (the workers never see their traffic).
                    let f = nat.flowStats(service: svc.name, server: j)
                    sc.sessions = f.newConnections
                    sc.picks = f.newConnections
                    sc.bytesIn = f.bytesIn
                    sc.bytesOut = f.bytesOut
                    current = f.flows
                }
                traffic("server", l, sc)
                gauge("server", "current_sessions", "", "Connections to the server", l, Double(current))
                gauge(
                    "server", "max_sessions", "", "Most connections to the server at once", l,
                    Double(s.activeMax.load(ordering: .relaxed)))
                gauge("server", "limit_sessions", "", "The server's maxconn (0: none)", l, Double(s.maxconn))
                gauge("server", "weight", "", "Effective weight", l, Double(s.effectiveWeight(now: now)))
                let check = ctx.checker?.view(s)
                let status = StatTable.status(s, check)
                for state in ["UP", "DOWN", "MAINT", "DRAIN", "NOCHECK"] {
                    let on = state == "NOCHECK" ? status == "no check" : status.hasPrefix(state)
                    gauge(
                        "server", "status", "", "Current state (one series per state, 1 for the current one)",
                        l + [("state", state)], on ? 1 : 0)
                }
                if let v = check, let last = v.last {
                    gauge(
                        "server", "check_duration", "seconds", "Duration of the last health check", l,
                        Double(last.durationMs) / 1000)
                    gauge(
                        "server", "check_up", "", "1 when the last health check passed", l, last.status.passed ? 1 : 0)
                }
                counter(
                    "server", "check_failures", "Failed health checks while UP", l,
                    UInt64(s.failedChecks.load(ordering: .relaxed)))
                counter(
                    "server", "check_up_down", "UP to DOWN transitions", l,
                    UInt64(s.downTransitions.load(ordering: .relaxed)))
                gauge(
                    "server", "downtime", "seconds", "Time spent DOWN or in maintenance", l,
                    Double(s.downtime(now: now)) / 1000)
            }
        }
        var pipesTotal = 0
        var pipesIdle = 0
        for w in ctx.workers {
            pipesTotal += w.pipesTotal.load(ordering: .relaxed)
            pipesIdle += w.pipesIdle.load(ordering: .relaxed)
        }
        gauge(
            "process", "current_connections", "", "Client connections open in the process", [],
            Double(ctx.shared.connections.load(ordering: .relaxed)))
        counter(
            "process", "connections", "Client connections accepted since start", [],
            UInt64(ctx.shared.totalConnections.load(ordering: .relaxed)))
        gauge(
            "process", "max_connections", "", "global.maxconn", [], Double(ctx.shared.maxconn.load(ordering: .relaxed)))
        gauge("process", "pipes_used", "", "Splice pipes holding bytes in flight", [], Double(pipesTotal - pipesIdle))
        gauge("process", "pipes_free", "", "Idle splice pipes in the worker pools", [], Double(pipesIdle))
        gauge("process", "uptime", "seconds", "Seconds since start", [], Double(ctx.uptimeSeconds()))
        gauge("process", "worker_threads", "", "Data-plane threads", [], Double(ctx.workers.count))
        var out: [UInt8] = []
        for name in order {
            let f = families[name]!
            out += "# HELP \(name) ".utf8
            for byte in f.help.utf8 {
                switch byte {
                case UInt8(ascii: "\\"): out += #"\\"#.utf8
                case UInt8(ascii: "\n"): out += #"\n"#.utf8
                default: out.append(byte)
                }
            }
            out += "\n# TYPE \(name) \(f.type)\n".utf8
            out += f.samples
        }
        families.removeAll(keepingCapacity: true)
        order.removeAll(keepingCapacity: true)
        return String(decoding: out, as: UTF8.self)
    }
}
