import BallastCore
import BallastProxy

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// `show info`: HAProxy 2.6's keys in its order, with Ballast's values; keys that mean nothing
/// here (SSL, compression, peers) read 0 as they do on an HAProxy without those features.
enum ShowInfo {
    /// HAProxy's field types (the typed and JSON output name them).
    enum FieldType: String {
        case u32, u64, str
    }

    struct Field {
        let name: String
        let type: FieldType
        let value: String
    }

    static func fields(_ ctx: AdminContext) -> [Field] {
        let uptime = ctx.uptimeSeconds()
        let d = uptime / 86400
        let h = (uptime % 86400) / 3600
        let m = (uptime % 3600) / 60
        let s = uptime % 60
        let mm = m < 10 ? "0\(m)" : "\(m)"
        let ss = s < 10 ? "0\(s)" : "\(s)"
        var rl = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
        var pipesTotal = 0
        var pipesIdle = 0
        for w in ctx.workers {
            pipesTotal += w.pipesTotal.load(ordering: .relaxed)
            pipesIdle += w.pipesIdle.load(ordering: .relaxed)
        }
        var bytesOut: UInt64 = 0
        var spliced: UInt64 = 0
        var sessions: UInt64 = 0
        for svc in ctx.table.services {
            let c = svc.stats.counters.raw()
            bytesOut &+= c.bytesOut
            spliced &+= c.splicedOut
            sessions &+= c.sessions
        }
        ctx.rates.sample(RateKeys.processBytesOut, bytesOut)
        let (connRate, connMax) = ctx.rates.rate(RateKeys.process)
        let (sessRate, sessMax) = ctx.rates.rate(RateKeys.processSessions)
        let (outRate, _) = ctx.rates.rate(RateKeys.processBytesOut)
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, 255)
        let cur = ctx.shared.connections.load(ordering: .relaxed)
        let u32 = FieldType.u32
        let u64 = FieldType.u64
        let str = FieldType.str
        let list: [(String, FieldType, String)] = [
            ("Name", str, "Ballast"), ("Version", str, BallastVersion.string), ("Release_date", str, "2026/11/25"),
            ("Nbthread", u32, "\(ctx.workers.count)"), ("Nbproc", u32, "1"), ("Process_num", u32, "1"),
            ("Pid", u32, "\(getpid())"),
            ("Uptime", str, "\(d)d \(h)h\(mm)m\(ss)s"), ("Uptime_sec", u32, "\(uptime)"), ("Memmax_MB", u32, "0"),
            ("PoolAlloc_MB", u32, "0"), ("PoolUsed_MB", u32, "0"), ("PoolFailed", u32, "0"),
            ("Ulimit-n", u32, "\(rl.rlim_cur)"),
            ("Maxsock", u32, "\(rl.rlim_cur)"), ("Maxconn", u32, "\(ctx.shared.maxconn.load(ordering: .relaxed))"),
            ("Hard_maxconn", u32, "\(ctx.hardMaxconn)"), ("CurrConns", u32, "\(cur)"),
            ("CumConns", u32, "\(ctx.shared.totalConnections.load(ordering: .relaxed))"), ("CumReq", u32, "0"),
            ("MaxSslConns", u32, "0"), ("CurrSslConns", u32, "0"), ("CumSslConns", u32, "0"), ("Maxpipes", u32, "0"),
            ("PipesUsed", u32, "\(pipesTotal - pipesIdle)"), ("PipesFree", u32, "\(pipesIdle)"),
            ("ConnRate", u32, "\(connRate)"),
            ("ConnRateLimit", u32, "0"), ("MaxConnRate", u32, "\(connMax)"), ("SessRate", u32, "\(sessRate)"),
            ("SessRateLimit", u32, "0"), ("MaxSessRate", u32, "\(sessMax)"), ("SslRate", u32, "0"),
            ("SslRateLimit", u32, "0"),
            ("MaxSslRate", u32, "0"), ("SslFrontendKeyRate", u32, "0"), ("SslFrontendMaxKeyRate", u32, "0"),
            ("SslFrontendSessionReuse_pct", u32, "0"), ("SslBackendKeyRate", u32, "0"),
            ("SslBackendMaxKeyRate", u32, "0"),
            ("SslCacheLookups", u32, "0"), ("SslCacheMisses", u32, "0"), ("CompressBpsIn", u32, "0"),
            ("CompressBpsOut", u32, "0"),
            ("CompressBpsRateLim", u32, "0"), ("Tasks", u32, "\(cur)"), ("Run_queue", u32, "0"),
            ("Idle_pct", u32, "100"),
            ("node", str, String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)),
            ("Stopping", u32, ctx.stopping.load(ordering: .relaxed) ? "1" : "0"),
            ("Jobs", u32, "\(cur + ctx.listeners.load(ordering: .relaxed))"), ("Unstoppable Jobs", u32, "0"),
            ("Listeners", u32, "\(ctx.listeners.load(ordering: .relaxed))"), ("ActivePeers", u32, "0"),
            ("ConnectedPeers", u32, "0"),
            ("DroppedLogs", u32, "0"), ("BusyPolling", u32, "0"), ("FailedResolutions", u32, "0"),
            ("TotalBytesOut", u64, "\(bytesOut)"),
            // 2.6 spells it with a typo; later versions fixed it. Scripts exist for both.
            ("TotalSplicdedBytesOut", u64, "\(spliced)"), ("TotalSplicedBytesOut", u64, "\(spliced)"),
            ("BytesOutRate", u64, "\(outRate)"), ("DebugCommandsIssued", u32, "0"), ("CumRecvLogs", u32, "0"),
            ("Build info", str, BallastVersion.build), ("Memmax_bytes", u64, "0"), ("PoolAlloc_bytes", u64, "0"),
            ("PoolUsed_bytes", u64, "0"), ("Start_time_sec", u32, "\(ctx.startWall)"), ("Tainted", u32, "0"),
        ]
        return list.map { Field(name: $0.0, type: $0.1, value: $0.2) }
    }

    static func render(_ ctx: AdminContext, typed: Bool, json: Bool) -> String {
        let f = fields(ctx)
        if json {
            let items = f.enumerated().map { k, e in
                let v = e.type == .str ? StatTable.jsonString(e.value) : e.value
                return
                    "{\"field\":{\"pos\":\(k),\"name\":\"\(e.name)\"},\"processNum\":1,\"tags\":{\"origin\":\"Product\",\"nature\":\"Output\",\"scope\":\"Service\"},\"value\":{\"type\":\"\(e.type.rawValue)\",\"value\":\(v)}}"
            }
            return "[" + items.joined(separator: ",") + "]\n\n"
        }
        if typed {
            return f.enumerated().map { k, e in
                "\(k).\(e.name).1:\(e.type == .str ? "POS" : "MGP"):\(e.type.rawValue):\(e.value)\n"
            }.joined() + "\n"
        }
        return f.map { "\($0.name): \($0.value)\n" }.joined() + "\n"
    }
}
