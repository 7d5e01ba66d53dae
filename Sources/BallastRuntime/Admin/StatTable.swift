import BallastCore
import BallastHealth
import BallastNat
import BallastProxy

/// `show stat` as HAProxy 2.6 writes it: the same 128 column names in the same order (fields
/// 0–102 are positional; scripts cut by position), one FRONTEND row, the server rows and one
/// BACKEND row per service. Fields that mean nothing for Ballast stay empty where HAProxy leaves
/// them empty, and read 0 where HAProxy writes 0.
enum StatTable {
    /// The columns, in HAProxy's order: the case names are the header's names (`dash` is the
    /// `-` column), so the header and the positions cannot disagree.
    enum F: Int, CaseIterable {
        case pxname, svname, qcur, qmax, scur, smax, slim, stot, bin, bout, dreq, dresp, ereq, econ, eresp, wretr,
            wredis, status, weight, act, bck, chkfail, chkdown, lastchg, downtime, qlimit, pid, iid, sid, throttle,
            lbtot, tracked, type, rate, rate_lim, rate_max, check_status, check_code, check_duration, hrsp_1xx,
            hrsp_2xx, hrsp_3xx, hrsp_4xx, hrsp_5xx, hrsp_other, hanafail, req_rate, req_rate_max, req_tot, cli_abrt,
            srv_abrt, comp_in, comp_out, comp_byp, comp_rsp, lastsess, last_chk, last_agt, qtime, ctime, rtime,
            ttime, agent_status, agent_code, agent_duration, check_desc, agent_desc, check_rise, check_fall,
            check_health, agent_rise, agent_fall, agent_health, addr, cookie, mode, algo, conn_rate, conn_rate_max,
            conn_tot, intercepted, dcon, dses, wrew, connect, reuse, cache_lookups, cache_hits, srv_icur, src_ilim,
            qtime_max, ctime_max, rtime_max, ttime_max, eint, idle_conn_cur, safe_conn_cur, used_conn_cur,
            need_conn_est, uweight, agg_server_status, agg_server_check_status, agg_check_status, dash, ssl_sess,
            ssl_reused_sess, ssl_failed_handshake, h2_headers_rcvd, h2_data_rcvd, h2_settings_rcvd,
            h2_rst_stream_rcvd, h2_goaway_rcvd, h2_detected_conn_protocol_errors, h2_detected_strm_protocol_errors,
            h2_rst_stream_resp, h2_goaway_resp, h2_open_connections, h2_backend_open_streams, h2_total_connections,
            h2_backend_total_streams, h1_open_connections, h1_open_streams, h1_total_connections, h1_total_streams,
            h1_bytes_in, h1_bytes_out, h1_spliced_bytes_in, h1_spliced_bytes_out
    }

    static let names: [String] = F.allCases.map { $0 == .dash ? "-" : "\($0)" }

    static let header = "# " + names.joined(separator: ",") + ",\n"

    /// Index of the `-` column that closes the static fields.
    static let staticEnd = 103

    enum Kind: Int {
        case frontend = 0, backend = 1, server = 2

        var letter: String { self == .frontend ? "F" : self == .backend ? "B" : "S" }
        var mask: Int { 1 << rawValue }
        var jsonName: String { self == .frontend ? "Frontend" : self == .backend ? "Backend" : "Server" }
    }

    struct Row {
        var kind: Kind
        var iid: Int
        var sid: Int
        var f = [String](repeating: "", count: names.count)

        init(kind: Kind, iid: Int, sid: Int) {
            self.kind = kind
            self.iid = iid
            self.sid = sid
        }

        subscript(_ field: F) -> String {
            get { f[field.rawValue] }
            set { f[field.rawValue] = newValue }
        }

        mutating func zero(_ list: [F]) { for n in list { f[n.rawValue] = "0" } }

        /// Appends the row as a CSV line: HAProxy quotes a field only when it holds a comma, a
        /// quote or a line break, and ends every row with a comma.
        func csv(into out: inout [UInt8]) {
            for var v in f {
                v.withUTF8 { b in
                    var plain = true
                    for c in b where c == 44 || c == 34 || c == 10 || c == 13 {
                        plain = false
                        break
                    }
                    if plain {
                        out.append(contentsOf: b)
                    } else {
                        out.append(34)
                        for c in b {
                            if c == 34 { out.append(34) }
                            out.append(c)
                        }
                        out.append(34)
                    }
                }
                out.append(44)
            }
            out.append(10)
        }
    }

    /// Extra (per-module) counters after `-`: HAProxy writes zeros for these on proxies, and only
    /// the three ssl ones on servers.
    static let moduleFields: [F] = ((staticEnd + 1)..<names.count).map { F(rawValue: $0)! }

    // MARK: - Rows

    static func rows(_ ctx: AdminContext, service filter: Service? = nil, kinds: Int = -1, sid: Int = -1) -> [Row] {
        let table = ctx.table
        let now = monotonicMillis()
        var out: [Row] = []
        for (k, svc) in table.services.enumerated() where filter == nil || filter === svc {
            let iid = k + 1
            // nat services: the kernel's counters (conntrack by server mark), not the workers'.
            let flows: [FlowStats]? =
                svc.config.mode.isKernel
                ? ctx.nat.map { nat in svc.servers.indices.map { nat.flowStats(service: svc.name, server: $0) } } : nil
            let total = flows?.reduce(into: FlowStats()) { $0.add($1) }
            if kinds & Kind.frontend.mask != 0 && (sid == -1 || sid == 0) {
                var r = frontend(ctx, svc, iid)
                if let total { kernel(&r, total) }
                out.append(r)
            }
            if kinds & Kind.server.mask != 0 {
                for (j, s) in svc.servers.enumerated() where sid == -1 || sid == j + 1 {
                    var r = server(ctx, svc, s, j, iid, now)
                    if let flows { kernel(&r, flows[j]) }
                    out.append(r)
                }
            }
            if kinds & Kind.backend.mask != 0 && (sid == -1 || sid == 0) {
                var r = backend(ctx, svc, iid, now)
                if let total { kernel(&r, total) }
                out.append(r)
            }
        }
        return out
    }

    /// A nat row's traffic as the kernel counts it: live flows (conntrack), connections and
    /// bytes each way (the table's per-server counters).
    static func kernel(_ r: inout Row, _ f: FlowStats) {
        r[.scur] = "\(f.flows)"
        r[.bin] = "\(f.bytesIn)"
        r[.bout] = "\(f.bytesOut)"
        r[.stot] = "\(f.newConnections)"
        if r.kind == .frontend {
            r[.conn_tot] = "\(f.newConnections)"
        } else {
            r[.lbtot] = "\(f.newConnections)"
            r[.connect] = "\(f.newConnections)"
        }
    }

    static func frontend(_ ctx: AdminContext, _ svc: Service, _ iid: Int) -> Row {
        var r = Row(kind: .frontend, iid: iid, sid: 0)
        let st = svc.stats
        let c = st.counters.total()
        let (rate, rateMax) = ctx.rates.rate(st.counters)
        r[.pxname] = svc.name
        r[.svname] = "FRONTEND"
        r[.scur] = "\(st.clients.load(ordering: .relaxed))"
        r[.smax] = "\(st.clientsMax.load(ordering: .relaxed))"
        r[.slim] = "\(ctx.shared.maxconn.load(ordering: .relaxed))"
        r[.stot] = "\(c.accepted)"
        r[.bin] = "\(c.bytesIn)"
        r[.bout] = "\(c.bytesOut)"
        r.zero([
            .dreq, .dresp, .req_rate, .req_rate_max, .req_tot, .comp_in, .comp_out, .comp_byp, .comp_rsp,
            .dses, .wrew, .eint, .rate_lim,
        ])
        // Clients refused by the access list or a per-client limit (HAProxy: tcp-request connection reject).
        r[.dcon] = "\(svc.config.mode.isKernel ? ctx.nat?.refused(service: svc.name) ?? 0 : st.access.totalRefused)"
        r[.ereq] = "\(c.requestErrors)"
        r[.status] = ctx.stopping.load(ordering: .relaxed) ? "STOP" : "OPEN"
        common(&r, iid: iid, sid: 0, type: 0)
        r[.rate] = "\(rate)"
        r[.rate_max] = "\(rateMax)"
        r[.mode] = "tcp"
        r[.conn_rate] = "\(rate)"
        r[.conn_rate_max] = "\(rateMax)"
        r[.conn_tot] = "\(c.accepted)"
        r[.dash] = "-"
        r.zero(moduleFields)
        return r
    }

    /// The connection counters a server row and a backend row share (HAProxy fills them alike).
    static func sessions(_ r: inout Row, _ c: CounterSlot, lastSession: Int64, now: Int64) {
        r[.stot] = "\(c.sessions)"
        r[.bin] = "\(c.bytesIn)"
        r[.bout] = "\(c.bytesOut)"
        r[.econ] = "\(c.connectErrors)"
        r[.eresp] = "\(c.responseErrors)"
        r[.wretr] = "\(c.retries)"
        r[.wredis] = "\(c.redispatches)"
        r[.lbtot] = "\(c.picks)"
        r[.cli_abrt] = "\(c.clientAborts)"
        r[.srv_abrt] = "\(c.serverAborts)"
        r[.lastsess] = lastSession == 0 ? "-1" : "\(max(0, now - lastSession) / 1000)"
        r[.connect] = "\(c.sessions)"
    }

    static func common(_ r: inout Row, iid: Int, sid: Int, type: Int) {
        r[.pid] = "1"
        r[.iid] = "\(iid)"
        r[.sid] = "\(sid)"
        r[.type] = "\(type)"
    }

    /// HAProxy's server status words.
    static func status(_ s: Server, _ check: CheckView?) -> String {
        if s.adminState == .maint { return "MAINT" }
        if !s.hasAddress.load(ordering: .relaxed) { return "MAINT (resolution)" }
        if s.noNeighbour.load(ordering: .relaxed) { return "DOWN" }
        let up = s.up.load(ordering: .relaxed)
        let checked = check.map { $0.enabled } ?? false
        if !up {
            if checked, let v = check, v.successes > 0 { return "DOWN \(v.successes)/\(v.rise)" }
            return "DOWN"
        }
        if s.adminState == .drain || s.weight == 0 { return "DRAIN" }
        guard checked, let v = check else { return "no check" }
        if v.failures > 0 { return "UP \(max(1, v.fall - v.failures))/\(v.fall)" }
        return "UP"
    }

    static func server(_ ctx: AdminContext, _ svc: Service, _ s: Server, _ j: Int, _ iid: Int, _ now: Int64) -> Row {
        var r = Row(kind: .server, iid: iid, sid: j + 1)
        let c = s.counters.total()
        let (rate, rateMax) = ctx.rates.rate(s.counters)
        let check = ctx.checker?.view(s)
        let checked = check?.enabled ?? false
        let backup = svc.config.servers[j].backup
        r[.pxname] = svc.name
        r[.svname] = s.name
        r.zero([
            .qcur, .qmax, .dresp, .wrew, .reuse, .srv_icur, .qtime, .ctime, .rtime, .ttime, .qtime_max,
            .ctime_max, .rtime_max, .ttime_max, .eint, .idle_conn_cur, .safe_conn_cur, .used_conn_cur,
        ])
        r[.scur] = "\(s.active.load(ordering: .relaxed))"
        r[.smax] = "\(s.activeMax.load(ordering: .relaxed))"
        if s.maxconn > 0 { r[.slim] = "\(s.maxconn)" }
        sessions(&r, c, lastSession: s.lastSession.load(ordering: .relaxed), now: now)
        r[.status] = status(s, check)
        r[.weight] = "\(s.effectiveWeight(now: now))"
        r[.act] = backup ? "0" : "1"
        r[.bck] = backup ? "1" : "0"
        r[.lastchg] = "\(max(0, now - s.lastChange.load(ordering: .relaxed)) / 1000)"
        if checked {
            r[.chkfail] = "\(s.failedChecks.load(ordering: .relaxed))"
            r[.chkdown] = "\(s.downTransitions.load(ordering: .relaxed))"
            r[.downtime] = "\(s.downtime(now: now) / 1000)"
        }
        common(&r, iid: iid, sid: j + 1, type: 2)
        let weight = s.weight
        let eff = s.effectiveWeight(now: now)
        if eff < weight && weight > 0 { r[.throttle] = "\(eff * 100 / weight)" }
        r[.rate] = "\(rate)"
        r[.rate_max] = "\(rateMax)"
        if checked, let v = check {
            if let last = v.last {
                r[.check_status] = (v.running ? "* " : "") + last.status.rawValue
                if let code = last.code { r[.check_code] = "\(code)" }
                r[.check_duration] = "\(last.durationMs)"
                r[.last_chk] = last.detail
                r[.check_desc] = last.status.text
            } else {
                r[.check_status] = (v.running ? "* " : "") + "INI"
                r[.check_desc] = "Initializing"
            }
            r[.check_rise] = "\(v.rise)"
            r[.check_fall] = "\(v.fall)"
            r[.check_health] = "\(v.health)"
        }
        // dsr mode: the server is DOWN because the kernel has no MAC address for it; say so
        // where HAProxy says why a server is down.
        if s.noNeighbour.load(ordering: .relaxed) { r[.last_chk] = s.link.reason }
        r[.addr] = s.hasAddress.load(ordering: .relaxed) ? s.address.description : ""
        r[.mode] = "tcp"
        r[.need_conn_est] = "0"
        r[.uweight] = "\(weight)"
        r[.dash] = "-"
        r.zero([.ssl_sess, .ssl_reused_sess, .ssl_failed_handshake])
        return r
    }

    static func backend(_ ctx: AdminContext, _ svc: Service, _ iid: Int, _ now: Int64) -> Row {
        var r = Row(kind: .backend, iid: iid, sid: 0)
        let st = svc.stats
        let c = st.counters.total()
        let (rate, rateMax) = ctx.rates.rate(st)
        var act = 0
        var bck = 0
        var weight = 0
        var uweight = 0
        var bweight = 0
        var buweight = 0
        for (j, s) in svc.servers.enumerated()
        where s.usable || (s.up.load(ordering: .relaxed) && s.adminState == .ready) {
            if svc.config.servers[j].backup {
                bck += 1
                bweight += s.effectiveWeight(now: now)
                buweight += s.weight
            } else {
                act += 1
                weight += s.effectiveWeight(now: now)
                uweight += s.weight
            }
        }
        if act == 0 {
            // Running on backups: HAProxy reports their weight (the first only without allbackups).
            weight =
                svc.config.allbackups
                ? bweight : min(bweight, svc.backupIndices.first.map { svc.servers[$0].weight } ?? 0)
            uweight = svc.config.allbackups ? buweight : weight
        }
        let up = act + bck > 0
        st.observe(up: up, now: now)
        let queued = st.queued.load(ordering: .relaxed)
        r[.pxname] = svc.name
        r[.svname] = "BACKEND"
        r[.qcur] = "\(queued)"
        r[.qmax] = "\(st.queuedMax.load(ordering: .relaxed))"
        r[.scur] = "\(st.assigned.load(ordering: .relaxed) + queued)"
        r[.smax] = "\(st.assignedMax.load(ordering: .relaxed))"
        r[.slim] = "\((ctx.shared.maxconn.load(ordering: .relaxed) + 9) / 10)"
        sessions(&r, c, lastSession: st.lastSession.load(ordering: .relaxed), now: now)
        r.zero([
            .dreq, .dresp, .comp_in, .comp_out, .comp_byp, .comp_rsp, .qtime, .ctime, .rtime, .ttime,
            .wrew, .reuse, .qtime_max, .ctime_max, .rtime_max, .ttime_max, .eint,
            .agg_server_status, .agg_server_check_status, .agg_check_status,
        ])
        r[.status] = up ? "UP" : "DOWN"
        r[.weight] = "\(weight)"
        r[.act] = "\(act)"
        r[.bck] = "\(bck)"
        r[.chkdown] = "\(st.downTransitions.load(ordering: .relaxed))"
        r[.lastchg] = "\(max(0, now - st.lastChange.load(ordering: .relaxed)) / 1000)"
        r[.downtime] = "\(st.downtime(now: now) / 1000)"
        common(&r, iid: iid, sid: 0, type: 1)
        r[.rate] = "\(rate)"
        r[.rate_max] = "\(rateMax)"
        r[.mode] = "tcp"
        r[.algo] = svc.config.balance.rawValue
        r[.uweight] = "\(uweight)"
        r[.dash] = "-"
        r.zero(moduleFields)
        return r
    }

    // MARK: - Typed and JSON forms

    /// HAProxy's `origin nature scope` tags and value type per static field (from 2.6's typed
    /// output); backends differ on a few gauges.
    static func tags(_ pos: Int, _ kind: Kind) -> (String, String) {
        let name = names[pos]
        switch name {
        case "pxname", "svname": return ("KNS", "str")
        case "qcur", "scur", "srv_icur", "idle_conn_cur", "safe_conn_cur", "used_conn_cur", "need_conn_est",
            "agg_server_status", "agg_server_check_status", "agg_check_status":
            return ("MGP", "u32")
        case "qmax", "smax", "req_rate_max", "conn_rate_max", "qtime_max", "ctime_max", "rtime_max", "ttime_max":
            return ("MMP", "u32")
        case "slim", "rate_lim", "qlimit": return ("CLP", "u32")
        case "status": return ("SGP", "str")
        case "weight", "qtime", "ctime", "rtime", "ttime", "uweight": return ("MaP", "u32")
        case "act", "bck": return (kind == .backend ? "MGP" : "SGP", "u32")
        case "lastchg": return ("MAP", "u32")
        case "downtime": return ("MCP", "u32")
        case "pid": return ("KGP", "u32")
        case "iid", "sid": return ("KGS", "u32")
        case "type", "check_rise", "check_fall", "check_health": return ("CGS", "u32")
        case "rate", "req_rate", "conn_rate": return (kind == .backend ? "MGP" : "MRP", "u32")
        case "rate_max": return (kind == .backend ? "MGP" : "MMP", "u32")
        case "check_status", "last_chk", "check_desc": return ("MOP", "str")
        case "check_code": return ("MOP", "u32")
        case "check_duration": return ("MDP", "u64")
        case "throttle": return ("MGP", "u32")
        case "lastsess": return ("MAP", "s32")
        case "addr", "mode", "algo": return ("CGS", "str")
        default: return ("MCP", "u64")
        }
    }

    static func typed(_ rows: [Row]) -> String {
        var out = ""
        for r in rows {
            for pos in 0..<staticEnd where !r.f[pos].isEmpty {
                let (tag, type) = tags(pos, r.kind)
                out += "\(r.kind.letter).\(r.iid).\(r.sid).\(pos).\(names[pos]).1:\(tag):\(type):\(r.f[pos])\n"
            }
        }
        return out
    }

    static func json(_ rows: [Row]) -> String {
        var objs: [String] = []
        for r in rows {
            var fields: [String] = []
            for pos in 0..<staticEnd where !r.f[pos].isEmpty {
                let (tag, type) = tags(pos, r.kind)
                let value = type == "str" ? jsonString(r.f[pos]) : r.f[pos]
                fields.append(
                    "{\"objType\":\"\(r.kind.jsonName)\",\"proxyId\":\(r.iid),\"id\":\(r.sid),\"field\":{\"pos\":\(pos),\"name\":\"\(names[pos])\"},\"processNum\":1,\"tags\":\(jsonTags(tag)),\"value\":{\"type\":\"\(type)\",\"value\":\(value)}}"
                )
            }
            objs.append("[" + fields.joined(separator: ",") + "]")
        }
        return "[" + objs.joined(separator: ",") + "]\n"
    }

    static func jsonTags(_ t: String) -> String {
        let c = Array(t)
        let origin: [Character: String] = ["M": "Metric", "S": "Status", "K": "Key", "C": "Config", "P": "Product"]
        let nature: [Character: String] = [
            "G": "Gauge", "M": "Limit", "L": "Limit", "C": "Counter", "R": "Rate", "N": "Name", "a": "Age", "A": "Age",
            "O": "Output", "D": "Duration",
        ]
        let scope: [Character: String] = ["P": "Process", "S": "Service", "s": "System"]
        return
            "{\"origin\":\"\(origin[c[0]] ?? "Unknown")\",\"nature\":\"\(nature[c[1]] ?? "Unknown")\",\"scope\":\"\(scope[c[2]] ?? "Unknown")\"}"
    }

    /// JSON string literal (the log handler's encoder: one implementation in the module).
    static func jsonString(_ s: String) -> String { LineLogHandler.jsonString(s) }
}
