import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// nat mode on a keepalived pair with conntrackd: an established connection through the VIP
/// survives the loss of the active node (its Ballast killed, then its link down).
extension BalancerPairSuites {
    @Suite(.serialized) struct NatPairTests {
        @Test(
            "nat mode + conntrackd: an echo conversation through the VIP survives kill -9 of the active Ballast and its link going down",
            .enabled(if: NatHALab.available, "needs root, keepalived, conntrackd, nftables, socat"))
        func flowsSurvive() throws {
            let lab = try NatHALab()
            var a: BallastProcess? = try lab.startBallast("a")
            let b = try lab.startBallast("b")
            defer { b.stop() }
            try lab.startConntrackd("a")
            try lab.startConntrackd("b")
            try lab.startKeepalived("a", priority: 150)
            try lab.startKeepalived("b", priority: 100)
            #expect(lab.waitHolder("a", timeout: 20), "\(lab.lastWait)\n\(lab.log("keepalived", "a"))")
            usleep(1_000_000)
            let (client, out) = try lab.startConversation(seconds: 90)
            usleep(2_000_000)

            // 1. kill -9 Ballast on the active node: the kernel rules stay, but `ballast health`
            // fails, the VIPs move to b, and b commits the flows conntrackd synced.
            a!.signal(SIGKILL)
            _ = a!.waitExit(timeout: 5)
            a = nil
            #expect(lab.waitHolder("b", timeout: 20), "\(lab.lastWait)\n\(lab.log("keepalived", "a"))")
            usleep(3_000_000)
            // 2. Ballast back on a (the VIPs return, preempting); then a's client link goes down.
            a = try lab.startBallast("a")
            defer { a?.stop() }
            #expect(lab.waitHolder("a", timeout: 20), "\(lab.lastWait)\n\(lab.log("keepalived", "a"))")
            usleep(2_500_000)
            let downAt = Date().timeIntervalSince1970
            try NatHALab.sh([NatHALab.ip, "-n", lab.ns("a"), "link", "set", lab.front("a"), "down"])
            #expect(lab.waitHolder("b", timeout: 20), "\(lab.lastWait)\n\(lab.log("keepalived", "b"))")
            // The conversation goes on through b for a while, then is asked to end.
            usleep(3_000_000)
            lab.stopConversation(out)
            NatLab.waitGone(client, timeout: 30)
            let log = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
            let summary = log.split(separator: "\n").last.map(String.init) ?? ""
            print("nat pair: \(log.split(separator: "\n").first ?? ""); \(summary)")
            #expect(
                summary.hasPrefix("done ") && summary.hasSuffix("error="),
                "\(log)\n--- a\n\(lab.log("keepalived", "a"))\n--- b\n\(lab.log("keepalived", "b"))\n--- conntrackd b\n\(lab.log("conntrackd", "b"))"
            )
            let parts = Dictionary(
                uniqueKeysWithValues: summary.split(separator: " ").dropFirst().compactMap { kv -> (String, String)? in
                    let p = kv.split(separator: "=", maxSplits: 1)
                    return p.count == 2 ? (String(p[0]), String(p[1])) : nil
                })
            #expect(parts["sent"] == parts["ok"], "\(summary)")
            #expect((Double(parts["longest_gap"] ?? "") ?? 99) < 5, "\(summary)")
            // It was still answered after the link went down (so the gap above covers that move).
            #expect((Double(parts["last_ok"] ?? "") ?? 0) > downAt + 2, "\(summary), link down at \(downAt)")
        }
    }
}
