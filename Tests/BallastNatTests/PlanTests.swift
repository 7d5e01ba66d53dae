import BallastCore
import CNftables
import Foundation
import Testing

@testable import BallastNat

/// nat mode's plan without a kernel: what counts as the same service (a reload's difference),
/// which servers keep their counter chains, the interval sets' elements, and the text.
struct PlanTests {
    static func config(_ services: String) throws -> Config {
        try ConfigLoader.load(path: "nat.yaml", contents: "services:\n" + services)
    }

    static let web = """
          - name: web
            mode: nat
            bind: "10.0.0.1:80"
            servers:
              - { name: s1, address: "10.0.1.1:80", weight: 2 }
              - { name: s2, address: "10.0.1.2:80" }

        """

    /// The states `apply` would make for a config, every server up.
    static func states(_ config: Config) -> [String: NatController.ServiceState] {
        let table = ServiceTable.build(config: config, generation: 1, previous: nil, now: 0, states: ServerStates())
        var out: [String: NatController.ServiceState] = [:]
        for (k, svc) in table.services.enumerated() where svc.config.mode == .nat {
            let id = UInt32(k + 1)
            var st = NatController.ServiceState(
                name: svc.name, id: id, family: NatController.family(svc.config), config: svc.config,
                marks: svc.servers.indices.map { (id << 16) | UInt32($0 + 1) })
            st.weights = svc.servers.map(\.weight)
            st.addrs = svc.servers.map { $0.address }
            out[svc.name] = st
        }
        return out
    }

    @Test func sameServiceOrRebuilt() throws {
        let base = Self.states(try Self.config(Self.web))["web"]!
        // A weight is only the maps' content: the same objects.
        let weights = Self.states(try Self.config(Self.web.replacingOccurrences(of: "weight: 2", with: "weight: 5")))[
            "web"]!
        #expect(base.same(as: weights) && !base.sameMaps(as: weights))
        // Another address, another server list or another balance: rebuilt.
        for edit in [
            ("10.0.1.2:80", "10.0.1.3:80"), ("name: s2", "name: s3"), ("mode: nat", "mode: nat\n    balance: source"),
        ] {
            let other = Self.states(try Self.config(Self.web.replacingOccurrences(of: edit.0, with: edit.1)))["web"]!
            #expect(!base.same(as: other), "\(edit)")
        }
        // A server moved by DNS or `set server addr` keeps the objects; only its map element moves.
        var moved = base
        moved.addrs[1] = try SocketAddress(parsing: "10.0.1.9:80")
        #expect(base.same(as: moved) && !base.sameMaps(as: moved))
    }

    @Test func serversThatKeepTheirCounterChains() throws {
        let base = Self.states(try Self.config(Self.web))["web"]!
        // s2 renamed: s1 keeps its chain, s2's is new.
        let renamed = Self.states(try Self.config(Self.web.replacingOccurrences(of: "name: s2", with: "name: s3")))[
            "web"]!
        #expect(NatController.keptServers(base, renamed) == [0])
        // A server added at the end: both old ones keep theirs.
        let added = Self.states(
            try Self.config(Self.web + "      - { name: s3, address: \"10.0.1.3:80\" }\n"))["web"]!
        #expect(NatController.keptServers(base, added) == [0, 1])
        // Another family: nothing is kept.
        var v6 = added
        v6.family = UInt16(NFPROTO_IPV6)
        #expect(NatController.keptServers(base, v6).isEmpty)
    }

    @Test func intervalSetElements() throws {
        func p(_ t: String) throws -> IPPrefix { try IPPrefix(parsing: t) }
        // Overlapping and adjacent networks merge; each range is a start and the end after it.
        let merged = NatController.intervalElements([try p("10.0.0.0/8"), try p("10.1.0.0/16"), try p("11.0.0.0/8")])
        #expect(merged.map(\.key) == [[0, 0, 0, 0], [10, 0, 0, 0], [12, 0, 0, 0]])
        #expect(merged.map(\.intervalEnd) == [true, false, true])
        #expect(
            NatController.textRanges([try p("10.0.0.0/8"), try p("10.1.0.0/16"), try p("11.0.0.0/8")]) == [
                "10.0.0.0-11.255.255.255"
            ])
        // A range that runs to the top of the space has no end element.
        let top = NatController.intervalElements([try p("255.0.0.0/8")])
        #expect(top.map(\.key) == [[0, 0, 0, 0], [255, 0, 0, 0]] && top.last?.intervalEnd == false)
    }

    @Test func textOfAConfig() throws {
        let text = NatController.render(config: try Self.config(Self.web))
        #expect(text.contains("elements = { 0x00010001 : 10.0.1.1 . 80, 0x00010002 : 10.0.1.2 . 80 }"), "\(text)")
        #expect(
            text.contains(
                "set replies {\n\t\ttype ipv4_addr . inet_service\n\t\telements = { 10.0.1.1 . 80, 10.0.1.2 . 80 }"),
            "\(text)")
        #expect(text.contains("elements = { 0-1 : 0x00010001, 2 : 0x00010002 }"), "\(text)")
        #expect(text.contains("ct state new meta l4proto tcp ip saddr . tcp sport @replies counter drop"))
        // Every server's chain, then the service's; objects in the order the netlink batch makes them.
        let order = [
            "map be-web", "map rr-web", "chain forward", "chain svc-web", "chain srv-web-1", "chain srv-web-2",
        ]
        let at = order.map { text.range(of: $0)?.lowerBound }
        #expect(at.allSatisfy { $0 != nil } && zip(at, at.dropFirst()).allSatisfy { $0! < $1! }, "\(text)")
    }
}
