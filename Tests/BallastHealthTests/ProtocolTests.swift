import BallastCore
import Testing

@testable import BallastHealth

struct ProtocolTests {
    @Test func sha1Vectors() {
        func hex(_ b: [UInt8]) -> String { b.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() }
        #expect(hex(SHA1.hash(Array("abc".utf8))) == "a9993e364706816aba3e25717850c26c9cd0d89d")
        #expect(hex(SHA1.hash([])) == "da39a3ee5e6b4b0d3255bfef95601890afd80709")
        #expect(hex(SHA1.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))) == "84983e441c3bd26ebaae4aa1f95129e5e54670f1")
    }

    @Test("agent words", arguments: [
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
        #expect(RedisJudge.judge(bytes, config: c, eof: false)?.2 == "role is slave, the check requires master")
        #expect(RedisJudge.judge(Array("+PONG\r\n$20\r\n# Repl".utf8), config: c, eof: false) == nil)
    }
}
