import Testing

@testable import BallastCore

#if canImport(Glibc)
    import Glibc
#endif

/// Servers given by DNS name (with a resolver the test controls) and server changes made at
/// run time laid over a config.
struct NamesTests {
    static func addr(_ t: String) -> SocketAddress { try! SocketAddress(parsing: t) }

    /// A resolver answering from a table; anything else "does not resolve".
    static func resolver(_ table: [String: [String]]) -> NameResolver {
        { name in
            guard let list = table[name] else { return .failure(NameLookupError("Name or service not known")) }
            return .success(list.map { addr($0.contains(":") ? "[\($0)]:0" : "\($0):0") })
        }
    }

    static func config(_ servers: String, service: String = "", mode: String = "", bind: String = "10.0.0.1:6379")
        -> String
    {
        """
        services:
          - name: db
            bind: "\(bind)"
        \(mode.isEmpty ? "" : "    mode: \(mode)\n")\(service.isEmpty ? "" : "    \(service)\n")    servers:
        \(servers)
        """
    }

    @Test func hostNames() {
        for good in ["redis-0.redis.internal", "localhost", "a", "db_1.example.", "x1.y2"] {
            #expect(HostName.isValid(good), "\(good)")
        }
        for bad in ["", "-a.b", "a-.b", "a..b", "10.0.0.1", "1.2.3", "a b", String(repeating: "a", count: 64), "ü.de"] {
            #expect(!HostName.isValid(bad), "\(bad)")
        }
        #expect(HostName.split("redis-0.internal:6379")! == ("redis-0.internal", 6379))
        #expect(HostName.split("redis-0.internal") == nil)
        #expect(HostName.split("10.0.0.1:80") == nil)
        #expect(HostName.split("name:99999") == nil)
    }

    @Test func choosingFromAnAnswer() {
        let a = Self.addr
        // The current address among the answers: no hop.
        #expect(
            AddressChoice.choose(
                current: a("10.0.0.2:80"), answers: [a("10.0.0.1:0"), a("10.0.0.2:0")], port: 80, family: nil) == .keep)
        #expect(
            AddressChoice.choose(current: a("10.0.0.2:80"), answers: [a("10.0.0.3:0")], port: 80, family: nil)
                == .move(a("10.0.0.3:80")))
        // The same family first, even when the other comes first in the answer.
        #expect(
            AddressChoice.choose(
                current: a("10.0.0.2:80"), answers: [a("[2001:db8::1]:0"), a("10.0.0.4:0")], port: 80, family: nil)
                == .move(a("10.0.0.4:80")))
        #expect(
            AddressChoice.choose(current: a("10.0.0.2:80"), answers: [a("[2001:db8::1]:0")], port: 80, family: nil)
                == .otherFamily(a("[2001:db8::1]:80")))
        // No address yet: the first answer, unless a family is required (nat).
        #expect(
            AddressChoice.choose(current: nil, answers: [a("[2001:db8::1]:0"), a("10.0.0.4:0")], port: 80, family: nil)
                == .move(a("[2001:db8::1]:80")))
        #expect(
            AddressChoice.choose(
                current: nil, answers: [a("[2001:db8::1]:0"), a("10.0.0.4:0")], port: 80, family: AF_INET)
                == .move(a("10.0.0.4:80")))
        #expect(AddressChoice.choose(current: nil, answers: [], port: 80, family: nil) == .empty)
    }

    @Test func namesAtLoad() throws {
        let r = Self.resolver([
            "redis-0.internal": ["10.0.0.7"], "v6.internal": ["2001:db8::7"],
            "both.internal": ["2001:db8::8", "10.0.0.8"],
        ])
        let c = try ConfigLoader.load(
            path: "n.yaml",
            contents: Self.config(
                """
                      - { name: r0, address: "redis-0.internal:6379" }
                      - { name: r1, address: "later.internal:6379", init_addr: none, resolve_interval: 2s }
                      - { name: r2, address: "gone.internal:6379", init_addr: "libc,10.0.0.9" }
                """, service: "resolve_interval: 5s"), resolve: r)
        let s = c.services[0].servers
        #expect(s[0].address == Self.addr("10.0.0.7:6379") && s[0].hostname == "redis-0.internal" && s[0].resolved)
        #expect(s[0].resolveInterval.value == 5000)
        #expect(
            !s[1].resolved && s[1].hostname == "later.internal" && s[1].address.port == 6379
                && s[1].resolveInterval.value == 2000)
        #expect(s[2].resolved && s[2].address == Self.addr("10.0.0.9:6379"))
        // A nat service is one family: the answer of that family is taken.
        let n = try ConfigLoader.load(
            path: "n.yaml", contents: Self.config("      - { name: r0, address: \"both.internal:6379\" }", mode: "nat"),
            resolve: r)
        #expect(n.services[0].servers[0].address == Self.addr("10.0.0.8:6379"))
        // A Server object without an address is out of service until it gets one.
        let server = Server(config: s[1])
        #expect(!server.usable && server.isDown)
        server.setAddress(Self.addr("10.0.0.11:6379"))
        #expect(server.usable && !server.isDown && server.address == Self.addr("10.0.0.11:6379"))
    }

    @Test func badNames() {
        let r = Self.resolver(["v6.internal": ["2001:db8::7"]])
        let cases: [(String, String, String)] = [
            (
                "      - { name: r0, address: \"nosuch.internal:6379\" }", "",
                "n.yaml:5:30: service 'db' server 'r0': 'nosuch.internal' does not resolve (Name or service not known); init_addr: none starts the server out of service until it does"
            ),
            (
                "      - { name: r0, address: \"v6.internal:6379\" }", "nat",
                "'v6.internal' does not resolve (it resolves to 2001:db8::7 only, not an address of the service's family)"
            ),
            ("      - { name: r0, address: \"v6.internal:0\" }", "", "port 0 cannot be connected to"),
            (
                "      - { name: r0, address: \"10.0.0.1:6379\", init_addr: none }", "",
                "init_addr applies to a server given by DNS name, and '10.0.0.1:6379' is an address"
            ),
            (
                "      - { name: r0, address: \"v6.internal:6379\", init_addr: last }", "",
                "'last' (the address in a state file) is not supported"
            ),
            (
                "      - { name: r0, address: \"v6.internal:6379\", init_addr: \"libc,bogus\" }", "",
                "'bogus' is not libc, none or a numeric address"
            ),
            (
                "      - { name: r0, address: \"v6.internal:6379\", resolve_interval: 10ms }", "",
                "resolve_interval: 10ms is too short"
            ),
            ("      - { name: r0, address: \"not a name:6379\" }", "", "(nor is it a DNS name and a port)"),
        ]
        for (servers, mode, expected) in cases {
            do {
                _ = try ConfigLoader.load(path: "n.yaml", contents: Self.config(servers, mode: mode), resolve: r)
                Issue.record("accepted: \(servers)")
            } catch {
                #expect(error.description.contains(expected), "\(error.description)")
                // The server's line (the nat case has one line more before it).
                #expect(error.description.hasPrefix("n.yaml:\(mode.isEmpty ? 5 : 6):"), "\(error.description)")
            }
        }
        // Without a resolver a name is an error too (never looked up behind the caller's back).
        #expect(throws: ConfigError.self) {
            try ConfigLoader.load(
                path: "n.yaml", contents: Self.config("      - { name: r0, address: \"v6.internal:6379\" }"))
        }
    }

    @Test func runtimeChangesStayWhileTheServiceTextDoes() throws {
        let text = Self.config(
            """
                  - { name: r0, address: "10.0.0.7:6379" }
                  - { name: r1, address: "10.0.0.8:6379" }
            """)
        let c = try ConfigLoader.load(path: "n.yaml", contents: text)
        var changes = RuntimeServers()
        var added = AddedServer(name: "r2", address: Self.addr("10.0.0.9:6379"))
        added.weight = 7
        changes.add(added, to: c.services[0])
        changes.delete("r1", from: c.services[0])
        changes.move("r0", to: Self.addr("10.0.0.17:6380"), in: c.services[0])
        let (applied, dropped) = changes.apply(to: c)
        #expect(dropped.isEmpty)
        #expect(applied.services[0].servers.map(\.name) == ["r0", "r2"])
        #expect(applied.services[0].servers[0].address == Self.addr("10.0.0.17:6380"))
        #expect(applied.services[0].servers[1].weight == 7)
        // The same text elsewhere in the file (another service before it, comments): kept.
        let moved = try ConfigLoader.load(
            path: "n.yaml",
            contents: text.replacingOccurrences(
                of: "services:\n",
                with:
                    "services:\n  # a comment\n  - { name: other, bind: \"10.0.0.1:1\", servers: [{ name: o, address: \"10.0.0.2:1\" }] }\n"
            ))
        var again = changes
        #expect(again.apply(to: moved).dropped.isEmpty)
        // A changed service: dropped, the file wins.
        let edited = try ConfigLoader.load(
            path: "n.yaml", contents: text.replacingOccurrences(of: "10.0.0.8:6379", with: "10.0.0.8:6380"))
        var third = changes
        let (out, gone) = third.apply(to: edited)
        #expect(gone == ["db"] && third.isEmpty)
        #expect(out.services[0].servers.map(\.name) == ["r0", "r1"])
        // Moving a server back where the file has it forgets the move; deleting an added one forgets the add.
        var undo = changes
        undo.move("r0", to: Self.addr("10.0.0.7:6379"), in: c.services[0])
        undo.delete("r2", from: c.services[0])
        #expect(undo.services["db"]?.added.isEmpty == true && undo.services["db"]?.addresses.isEmpty == true)
    }
}
