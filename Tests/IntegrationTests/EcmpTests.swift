import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Active/active nat mode: a router spreads flows over both balancers (ECMP); one balancer is
/// withdrawn from the routes while 16 conversations are running, and its flows arrive at the
/// other one mid-connection.
extension BalancerPairSuites {
    @Suite(.serialized) struct EcmpTests {
        static func summary(_ flows: [EcmpLab.Flow]) -> String {
            flows.map { "\($0.port) via \($0.carrier) \($0.server)→\($0.after) \($0.ok)/\($0.sent) \($0.error)" }
                .joined(separator: "\n")
        }

        @Test(
            "active/active nat behind ECMP: the withdrawn balancer's flows reach the same server through the other (Maglev, no conntrackd); with roundrobin a moved flow lives only where the other's pick happens to match, with conntrackd every one",
            .enabled(if: EcmpLab.available, "needs root, conntrackd, nftables, socat, fib_multipath_hash_fields"))
        func withdrawal() throws {
            let lab = try EcmpLab()

            // 1. Maglev on the client's address and port, no conntrackd: b has never seen a's flows,
            // picks them up mid-connection (nf_conntrack_tcp_loose) and computes the same slot.
            var a = try lab.startBallast("a", balance: "source\n    hash_key: source-port")
            var b = try lab.startBallast("b", balance: "source\n    hash_key: source-port")
            #expect(a.waitForLog("started") != nil && b.waitForLog("started") != nil)
            usleep(800_000)
            // The whole Maglev table in the kernel is the same on both nodes, slot for slot.
            // (A dump that meets a map update is interrupted: list again.)
            func mapText(_ n: String) -> String {
                for _ in 0..<5 {
                    if let t = try? EcmpLab.sh([
                        EcmpLab.ip, "netns", "exec", lab.ns(n), "/usr/sbin/nft", "list", "map", "ip", "ballast",
                        "mg-web",
                    ]) {
                        return t
                    }
                    usleep(300_000)
                }
                return ""
            }
            let tables = ["a", "b"].map(mapText)
            #expect(tables[0].components(separatedBy: " : ").count > 65_000, "\(tables[0].prefix(500))")
            #expect(tables[0] == tables[1], "the two nodes' Maglev tables differ")
            let maglev = try lab.conversations(count: 16, seconds: 4, withdraw: "a", withdrawAfter: 1.5)
            let viaA = maglev.filter { $0.carrier == "a" }
            print(
                "ecmp, Maglev, no conntrackd: \(maglev.filter(\.survived).count)/\(maglev.count) flows survived, \(viaA.count) of them moved from a to b"
            )
            #expect(maglev.count == 16 && !viaA.isEmpty && viaA.count < 16, "\(Self.summary(maglev))")
            #expect(maglev.allSatisfy { $0.survived }, "\(Self.summary(maglev))")
            for f in viaA {
                #expect(
                    lab.name(of: f.after) == f.server, "flow \(f.port): b picked \(f.after), it began on \(f.server)")
            }
            _ = a.stop()
            _ = b.stop()

            // 2. roundrobin, no conntrackd: b's pick for a picked-up flow is only the next in its
            // rotation; a flow survives exactly when that is the server it began on (another
            // server answers the mid-connection segment with a reset).
            try lab.route(through: ["a", "b"])
            a = try lab.startBallast("a", balance: "roundrobin")
            b = try lab.startBallast("b", balance: "roundrobin")
            #expect(b.waitForLog("started") != nil)
            usleep(800_000)
            let rr = try lab.conversations(count: 16, seconds: 4, withdraw: "a", withdrawAfter: 1.5)
            let rrA = rr.filter { $0.carrier == "a" }
            print(
                "ecmp, roundrobin, no conntrackd: \(rrA.filter(\.survived).count) of the \(rrA.count) flows moved from a to b survived"
            )
            #expect(rr.count == 16 && !rrA.isEmpty, "\(Self.summary(rr))")
            #expect(rr.filter { $0.carrier == "b" }.allSatisfy { $0.survived }, "\(Self.summary(rr))")
            for f in rrA {
                #expect(
                    f.survived == (lab.name(of: f.after) == f.server),
                    "flow \(f.port) began on \(f.server), b sent it to \(f.after): \(f.error)")
            }

            // 3. roundrobin with conntrackd writing each node's flows into the other's table: b
            // already holds a's entries (and the server each names), every flow survives.
            _ = a.stop()
            _ = b.stop()
            try lab.route(through: ["a", "b"])
            try lab.startConntrackd()
            defer { lab.stopConntrackd() }
            a = try lab.startBallast("a", balance: "roundrobin")
            b = try lab.startBallast("b", balance: "roundrobin")
            defer {
                _ = a.stop()
                _ = b.stop()
            }
            #expect(b.waitForLog("started") != nil)
            usleep(800_000)
            let synced = try lab.conversations(count: 16, seconds: 4, withdraw: "a", withdrawAfter: 1.5)
            let syncedA = synced.filter { $0.carrier == "a" }
            print(
                "ecmp, roundrobin + conntrackd: \(synced.filter(\.survived).count)/\(synced.count) flows survived, \(syncedA.count) moved from a to b"
            )
            #expect(synced.count == 16 && !syncedA.isEmpty, "\(Self.summary(synced))")
            #expect(synced.allSatisfy { $0.survived }, "\(Self.summary(synced))")
            for f in syncedA {
                #expect(
                    lab.name(of: f.after) == f.server, "flow \(f.port): b holds \(f.after), it began on \(f.server)")
            }
        }
    }
}
