import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The balancer-pair tests build network namespaces and run keepalived's VRRP timers: they run
/// one after another, never beside each other (a loaded machine delays adverts and health scripts).
@Suite(.serialized) enum BalancerPairSuites {}

/// A Ballast pair on a floating address moved by the real keepalived, in network namespaces:
/// a client opens new connections to the VIP in a loop while the active node's Ballast is
/// killed, its link goes down, and it comes back.
extension BalancerPairSuites {
    @Suite(.serialized) struct KeepalivedTests {
        static let skip = "needs root, keepalived, iproute2 and socat (apt-get install keepalived socat)"

        @Test(
            "proxy mode, preempt: kill -9 of the active Ballast and its link going down move the VIP; new connections work again within 3 s; the node that comes back takes the VIP once",
            .enabled(if: HALab.available, Comment(rawValue: skip)))
        func killAndLinkDownWithPreempt() throws {
            let lab = try HALab()
            var a: BallastProcess? = try lab.startBallast("a")
            let b = try lab.startBallast("b")
            defer { b.stop() }
            // Benchmarks/ha.sh runs this test at other advertisement intervals.
            let advert = ProcessInfo.processInfo.environment["BALLAST_HA_ADVERT"] ?? "0.5"
            try lab.startKeepalived("a", priority: 150, preempt: true, advert: advert)
            try lab.startKeepalived("b", priority: 100, preempt: true, advert: advert)
            // State waits are generous: on a loaded host each look (`ip addr`) can take seconds.
            // How fast clients recover is measured by the client itself, below.
            #expect(lab.waitHolder("a", timeout: 20), "\(lab.lastWait)\n\(lab.keepalivedLog("a"))")
            let (client, out) = try lab.startClient(seconds: 90)
            usleep(1_000_000)

            // 1. kill -9 Ballast on the active node: `ballast health` fails, keepalived goes FAULT.
            let killedAt = Date().timeIntervalSince1970
            a!.signal(SIGKILL)
            _ = a!.waitExit(timeout: 5)
            a = nil
            #expect(lab.waitHolder("b", timeout: 20), "\(lab.lastWait)\n\(lab.keepalivedLog("a"))")
            usleep(1_500_000)

            // 2. Ballast back on a: with preemption the VIP returns to a (once).
            a = try lab.startBallast("a")
            #expect(
                lab.waitHolder("a", timeout: 20), "\(lab.lastWait)\n\(lab.addressReport())\n\(lab.keepalivedLog("a"))")
            usleep(1_500_000)

            // 3. The active node's link goes down: b's master-down timer (3 × 0.5 s + skew).
            let downAt = Date().timeIntervalSince1970
            try HALab.sh([HALab.ip, "-n", lab.ns("a"), "link", "set", lab.dev("a"), "down"])
            #expect(lab.waitHolder("b", timeout: 20), "\(lab.lastWait)\n\(lab.keepalivedLog("b"))")
            // The client runs until it has connected through b (or for 20 s more), then is ended.
            _ = HALab.waitClientOK(out, after: downAt, timeout: 20)
            usleep(500_000)
            client.signal(SIGTERM)
            NatLab.waitGone(client, timeout: 30)
            defer { a?.stop() }
            let log = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
            let kill = HALab.recovery(log, after: killedAt)
            let link = HALab.recovery(log, after: downAt)
            print(
                "keepalived proxy (advert_int \(advert)): kill -9 → new connections back after \(String(format: "%.2f", kill.seconds)) s (\(kill.failures) failed); link down → \(String(format: "%.2f", link.seconds)) s (\(link.failures) failed)"
            )
            #expect(kill.seconds < 3, "kill -9: \(kill)\n\(log)")
            // Link loss is seen by the backup's master-down timer: 3 × advert_int + skew (< advert_int).
            #expect(link.seconds < 4 * (Double(advert) ?? 0.5) + 1, "link down: \(link)\n\(log)")
            #expect(log.contains(" ok s1") || log.contains(" ok s2"))
            // Both faults were seen by the client: it connected after each (so neither figure is 0
            // for want of a measurement).
            #expect(HALab.attempts(log, after: downAt).contains { $0.ok }, "\(log)")
            // No flapping: a became master at start and once more on its return; b once per fault.
            #expect(lab.masterEntries("a") == 2, "\(lab.keepalivedLog("a"))")
            #expect(lab.masterEntries("b") == 2, "\(lab.keepalivedLog("b"))")
        }

        @Test(
            "proxy mode, nopreempt: the node that comes back stays backup; the VIP does not move again",
            .enabled(if: HALab.available, Comment(rawValue: skip)))
        func nopreemptStaysPut() throws {
            let lab = try HALab()
            var a: BallastProcess? = try lab.startBallast("a")
            let b = try lab.startBallast("b")
            defer { b.stop() }
            try lab.startKeepalived("a", priority: 150, preempt: false)
            try lab.startKeepalived("b", priority: 100, preempt: false)
            // Both start BACKUP; the higher priority wins the first election.
            #expect(lab.waitHolder("a", timeout: 20), "\(lab.lastWait)\n\(lab.keepalivedLog("a"))")
            a!.signal(SIGKILL)
            _ = a!.waitExit(timeout: 5)
            #expect(lab.waitHolder("b", timeout: 20), "\(lab.lastWait)\n\(lab.keepalivedLog("b"))")
            a = try lab.startBallast("a")
            defer { a?.stop() }
            // `ballast health` passes again on a (rise 2), but nopreempt keeps the VIP on b.
            usleep(4_000_000)
            #expect(lab.holds("b") && !lab.holds("a"), "\(lab.addressReport())\n\(lab.keepalivedLog("a"))")
            #expect(lab.masterEntries("a") == 1 && lab.masterEntries("b") == 1)
            let (client, out) = try lab.startClient(seconds: 1)
            NatLab.waitGone(client, timeout: 30)
            let log = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
            #expect(!log.contains(" err ") && log.contains(" ok "), "\(log)")
        }
    }
}
