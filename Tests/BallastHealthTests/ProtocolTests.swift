import BallastCore
import Testing

@testable import BallastHealth

struct ProtocolTests {
    @Test func sha1Vectors() {
        func hex(_ b: [UInt8]) -> String {
            b.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        }
        #expect(hex(SHA1.hash(Array("abc".utf8))) == "a9993e364706816aba3e25717850c26c9cd0d89d")
        #expect(hex(SHA1.hash([])) == "da39a3ee5e6b4b0d3255bfef95601890afd80709")
        #expect(
            hex(SHA1.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)))
                == "84983e441c3bd26ebaae4aa1f95129e5e54670f1")
    }

    @Test(
        "agent words",
        arguments: [
            ("up", AgentReply(weightPercent: nil, maxconn: nil, admin: nil, down: nil, up: true)),
            ("50% drain", AgentReply(weightPercent: 50, maxconn: nil, admin: .drain, down: nil, up: false)),
            ("maxconn:30,ready", AgentReply(weightPercent: nil, maxconn: 30, admin: .ready, down: nil, up: false)),
            ("down #disk full", AgentReply(weightPercent: nil, maxconn: nil, admin: nil, down: "disk full", up: false)),
            ("stopped", AgentReply(weightPercent: nil, maxconn: nil, admin: nil, down: "", up: false)),
            ("maint\t75%", AgentReply(weightPercent: 75, maxconn: nil, admin: .maint, down: nil, up: false)),
        ])
    func agentWords(line: String, expected: AgentReply) {
        #expect(AgentReply(line) == expected)
    }

    @Test("redis replies: a replica fails a master check at once")
    func redisRole() {
        var c = CheckConfig()
        c.type = .redis
        c.role = .master
        let info = "# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\n"
        let bytes = Array("+PONG\r\n$\(info.utf8.count)\r\n\(info)\r\n".utf8)
        let v = RedisJudge.judge(bytes, config: c, eof: false)
        #expect(v?.detail == "role is slave, the check requires master")
        #expect(v?.definite == true)
        #expect(RedisJudge.judge(Array("+PONG\r\n$20\r\n# Repl".utf8), config: c, eof: false) == nil)
    }

    static func info(_ lines: [String]) -> [UInt8] {
        let text = lines.joined(separator: "\r\n") + "\r\n"
        return Array("+PONG\r\n$\(text.utf8.count)\r\n\(text)\r\n".utf8)
    }

    @Test("redis replica check: link down, sync in progress and lag are definite failures")
    func redisReplica() {
        var c = CheckConfig()
        c.type = .redis
        c.role = .replica
        c.maxLag = Millis(5000)
        let up = Self.info([
            "role:slave", "master_link_status:up", "master_last_io_seconds_ago:1", "master_sync_in_progress:0",
        ])
        #expect(RedisJudge.judge(up, config: c, eof: false)?.status == .l7ok)
        let down = Self.info(["role:slave", "master_link_status:down", "master_last_io_seconds_ago:-1"])
        let vd = RedisJudge.judge(down, config: c, eof: false)
        #expect(vd?.detail == "replication link to the master is down (master_link_status:down)")
        #expect(vd?.definite == true)
        let lag = Self.info(["role:slave", "master_link_status:up", "master_last_io_seconds_ago:9"])
        #expect(
            RedisJudge.judge(lag, config: c, eof: false)?.detail
                == "replication lag 9 s > 5s (master_last_io_seconds_ago)")
        let master = Self.info(["role:master", "connected_slaves:0"])
        #expect(RedisJudge.judge(master, config: c, eof: false)?.detail == "role is master, the check requires replica")
    }

    @Test("RESP: nested arrays, nulls, incomplete input, garbage")
    func resp() {
        let bytes = Array("*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$5\r\nm a b\r\n*-1\r\n:12\r\n".utf8)
        let (values, used) = RESP.parseAll(bytes)
        #expect(values == [.array([.bulk("message"), .bulk("+switch-master"), .bulk("m a b")]), .null, .integer(12)])
        #expect(used == bytes.count)
        #expect(RESP.parseAll(Array("*2\r\n$3\r\nabc\r\n".utf8)).0.isEmpty)  // incomplete: wait
        if case .error(let e)? = RESP.parseAll(Array("hello\r\n".utf8)).0.first {
            #expect(e.hasPrefix("unexpected answer"))
        } else {
            Issue.record("garbage must be an error")
        }
    }

    func claim(_ name: String, _ port: UInt16, _ id: String, _ id2: String = MasterArbiter.noHistory)
        -> MasterArbiter.Claim
    {
        MasterArbiter.Claim(
            name: name, address: try! SocketAddress(parsing: "127.0.0.1:\(port)"), replid: id, replid2: id2)
    }

    @Test("arbiter: a promoted replica outranks the old master by its master_replid2")
    func arbiterHistory() {
        var a = MasterArbiter(usesSentinel: false)
        #expect(a.masterAnswer(1, claim("old", 7001, "AAAA")) == .accept(takeover: false, demote: [:]))
        // The replica is promoted: fresh id, the old master's id as replid2.
        guard case .accept(true, let demote) = a.masterAnswer(2, claim("new", 7002, "BBBB", "AAAA")) else {
            Issue.record("the promoted replica must take over")
            return
        }
        #expect(demote.keys.sorted() == [1])
        #expect(a.holder == 2)
        // The old master still says role:master: refused as stale.
        guard case .refuse(let why) = a.masterAnswer(1, claim("old", 7001, "AAAA")) else {
            Issue.record("the stale master must be refused")
            return
        }
        #expect(why.hasPrefix("stale master: new was promoted"))
    }

    @Test("arbiter: an empty master that comes back is held down while the serving one holds")
    func arbiterNoHistory() {
        var a = MasterArbiter(usesSentinel: false)
        #expect(a.masterAnswer(2, claim("b", 7002, "BBBB", "AAAA")) == .accept(takeover: false, demote: [:]))
        guard case .refuse(let why) = a.masterAnswer(1, claim("a", 7001, "CCCC")) else {
            Issue.record("a second master without history must be refused")
            return
        }
        #expect(why.contains("another master (b) already takes the writes"))
        // Once b stops claiming (it became a replica, or is unreachable), a may take over.
        a.noClaim(2)
        #expect(a.masterAnswer(1, claim("a", 7001, "CCCC")) == .accept(takeover: false, demote: [:]))
    }

    @Test("arbiter: with sentinel, only the named server takes writes")
    func arbiterSentinel() throws {
        var a = MasterArbiter(usesSentinel: true)
        // nothing named yet
        #expect(a.masterAnswer(1, claim("a", 7001, "AAAA")) == .accept(takeover: false, demote: [:]))
        let demote = a.sentinelNamed(try SocketAddress(parsing: "127.0.0.1:7002"))
        #expect(demote == [1: "not the master named by sentinel (127.0.0.1:7002)"])
        #expect(
            a.masterAnswer(1, claim("a", 7001, "AAAA")) == .refuse("not the master named by sentinel (127.0.0.1:7002)"))
        #expect(
            a.masterAnswer(2, claim("b", 7002, "BBBB"))
                == .accept(takeover: true, demote: [1: "not the master named by sentinel (127.0.0.1:7002)"]))
    }

    @Test("sentinel majority of the answers that arrived")
    func sentinelMajority() throws {
        let x = try SocketAddress(parsing: "127.0.0.1:1")
        let y = try SocketAddress(parsing: "127.0.0.1:2")
        #expect(SentinelWatcher.majority([x, x, y]) == .agreed(x))
        #expect(SentinelWatcher.majority([x]) == .agreed(x))
        #expect(SentinelWatcher.majority([]) == .none)
        #expect(SentinelWatcher.majority([x, y]) == .disagree([(x, 1), (y, 1)]))
    }

    static func lenencString(_ s: String?) -> [UInt8] {
        guard let s else { return [0xFB] }
        return [UInt8(s.utf8.count)] + Array(s.utf8)
    }

    static func column(_ name: String) -> [UInt8] {
        ["def", "", "", "", name, name].flatMap { lenencString($0) } + [0x0C, 33, 0, 0, 0, 0, 0xFD, 0, 0, 0, 0, 0]
    }

    @Test("mysql result reader: columns, rows, NULL, an ERR after the columns")
    func mysqlResult() {
        var r = ResultReader()
        #expect(r.feed([2]) == .more)
        #expect(r.feed(Self.column("Slave_SQL_Running")) == .more)
        #expect(r.feed(Self.column("Seconds_Behind_Master")) == .more)
        #expect(r.feed([0xFE, 0, 0, 2, 0]) == .more)
        #expect(r.feed(Self.lenencString("Yes") + Self.lenencString(nil)) == .more)
        #expect(
            r.feed([0xFE, 0, 0, 2, 0])
                == .done(ResultSet(columns: ["Slave_SQL_Running", "Seconds_Behind_Master"], rows: [["Yes", nil]])))
        // A statement that fails while executing: ERR after the column definitions.
        var e = ResultReader()
        #expect(e.feed([1]) == .more)
        #expect(e.feed(Self.column("x")) == .more)
        #expect(e.feed([0xFE, 0, 0, 2, 0]) == .more)
        let err: [UInt8] = [0xFF, 0x16, 0x05] + Array("#HY000division by zero".utf8)
        #expect(e.feed(err) == .error("division by zero (error 1302)"))
        var ok = ResultReader()
        #expect(ok.feed([0x00, 0, 0, 2, 0, 0, 0]) == .done(ResultSet()))
    }
}
