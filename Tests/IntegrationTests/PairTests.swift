import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Two Ballast nodes that act as one: the same picks for the same client (Maglev), and one
/// command for both (`ballast ctl --socket A --socket B`).
@Suite(.serialized) struct PairTests {
    static func node(_ dir: TempDir, _ name: String, servers: [(String, UInt16)]) throws -> BallastProcess {
        try BallastProcess(
            config: configYAML(
                global: "workers: 2\nstats: { sockets: [{ path: \"\(dir.file("\(name).sock"))\", level: admin }] }",
                services: [serviceYAML(servers: servers, extra: "balance: source")]))
    }

    @Test("the same config gives the same Maglev picks on both nodes: 100 clients keep their server across the pair")
    func maglevAgreement() throws {
        let servers = try ["a", "b", "c"].map { try TestServer.named($0) }
        defer { for s in servers { s.stop() } }
        let dir = TempDir()
        let list = servers.map { ($0.name, $0.port) }
        let n1 = try Self.node(dir, "n1", servers: list)
        defer { n1.stop() }
        let n2 = try Self.node(dir, "n2", servers: list)
        defer { n2.stop() }
        func pick(_ node: BallastProcess, _ client: Int) throws -> String {
            let fd = try Net.connect(node.port("svc"), from: "127.0.\(client / 250).\(client % 250 + 2)")
            defer { close(fd) }
            let (data, _) = Net.readAll(fd)
            return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        var spread: [String: Int] = [:]
        for client in 0..<100 {
            let first = try pick(n1, client)
            #expect(try pick(n2, client) == first, "client \(client) moves from \(first) when its node fails over")
            spread[first, default: 0] += 1
        }
        // Not a constant: the clients really are spread over the servers.
        #expect(spread.count == 3 && spread.values.allSatisfy { $0 >= 15 }, "\(spread)")
    }

    @Test(
        "ctl to both nodes: the command runs on each, each reply under its node's name; an unreachable node fails the exit status"
    )
    func ctlBothNodes() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let n1 = try Self.node(dir, "n1", servers: [("s1", echo.port), ("s2", echo.port)])
        defer { n1.stop() }
        let n2 = try Self.node(dir, "n2", servers: [("s1", echo.port), ("s2", echo.port)])
        defer { n2.stop() }
        let a = "n1=\(dir.file("n1.sock"))"
        let b = "n2=\(dir.file("n2.sock"))"
        let (s1, o1, e1) = try runCommand(
            Repo.ballast, ["ctl", "--socket", a, "--socket", b, "set", "server", "svc/s1", "state", "drain"])
        #expect(s1 == 0, "\(o1)\(e1)")
        #expect(
            o1.contains("== n1 (\(dir.file("n1.sock"))) ==") && o1.contains("== n2 (\(dir.file("n2.sock"))) =="),
            "\(o1)")
        for node in ["n1", "n2"] {
            let (_, stat, _) = try runCommand(
                Repo.ballast, ["ctl", "--socket", dir.file("\(node).sock"), "show", "stat"])
            let row = stat.split(separator: "\n").first { $0.hasPrefix("svc,s1,") } ?? ""
            #expect(row.contains(",DRAIN,"), "\(node): \(row)")
        }
        // A show command prints each node's answer.
        let (s2, o2, _) = try runCommand(
            Repo.ballast, ["ctl", "--socket", a, "--socket", b, "show", "servers", "state", "svc"])
        #expect(s2 == 0 && o2.components(separatedBy: "svc 1 s1").count == 3, "\(o2)")
        // An error answer to an action fails that node.
        let (s3, o3, e3) = try runCommand(
            Repo.ballast, ["ctl", "--socket", a, "--socket", b, "set", "server", "svc/nosuch", "state", "ready"])
        #expect(
            s3 == 1 && o3.contains("== n1 (\(dir.file("n1.sock"))): FAILED ==")
                && e3.contains("2 of 2 nodes failed: n1, n2"), "\(o3)\(e3)")
        // One node down: the other still runs the command; the exit status says which failed.
        n2.stop()
        let (s4, o4, e4) = try runCommand(
            Repo.ballast, ["ctl", "--socket", a, "--socket", b, "set", "server", "svc/s1", "state", "ready"])
        #expect(s4 == 1, "\(o4)")
        #expect(e4.contains("1 of 2 nodes failed: n2"), "\(e4)")
        #expect(
            o4.contains("== n2 (\(dir.file("n2.sock"))): FAILED: cannot connect to \(dir.file("n2.sock"))"), "\(o4)")
        let (_, stat, _) = try runCommand(Repo.ballast, ["ctl", "--socket", dir.file("n1.sock"), "show", "stat"])
        // Ready again on n1 (an unchecked server's status is HAProxy's "no check").
        #expect((stat.split(separator: "\n").first { $0.hasPrefix("svc,s1,") } ?? "").contains(",no check,"), "\(stat)")
    }
}
