import BallastCore
import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Balancing policies and server states through a real `ballast run`.
@Suite(.serialized) struct SchedulingTests {
    /// A held connection and the server it reached.
    struct Held {
        let fd: Int32
        let server: String
    }

    static func open(_ port: UInt16, from source: String? = nil) throws -> Held {
        let fd = try source.map { try Net.connect(port, from: $0) } ?? Net.connect(port)
        var name = [UInt8]()
        while name.last != 10 {
            let b = Net.readExactly(fd, 1)
            if b.isEmpty { break }
            name += b
        }
        return Held(fd: fd, server: String(decoding: name, as: UTF8.self).trimmingCharacters(in: .newlines))
    }

    static func tally(_ held: [Held]) -> [String: Int] {
        held.reduce(into: [:]) { $0[$1.server, default: 0] += 1 }
    }

    /// Closes `held` connections and waits until Ballast has let go of them.
    static func release(_ held: [Held]) {
        for h in held { close(h.fd) }
        usleep(300_000)
    }

    static func servers(_ names: [String]) throws -> [TestServer] { try names.map { try TestServer.namedEcho($0) } }

    @Test("leastconn: a new connection goes to the server with the fewest, not the next in turn")
    func leastconn() throws {
        let s = try Self.servers(["a", "b", "c"])
        defer { s.forEach { $0.stop() } }
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(servers: s.map { ($0.name, $0.port) }, extra: "balance: leastconn")
                ]))
        defer { p.stop() }
        let port = p.port("svc")
        var held = try (0..<6).map { _ in try Self.open(port) }
        #expect(Self.tally(held) == ["a": 2, "b": 2, "c": 2])
        Self.release(held.filter { $0.server == "a" })
        held.removeAll { $0.server == "a" }
        let more = try (0..<2).map { _ in try Self.open(port) }
        #expect(more.map(\.server) == ["a", "a"])
        Self.release(held + more)
    }

    @Test("roundrobin with two workers: one global order, so every period of 6 connections gives 3/2/1 exactly")
    func roundrobinAcrossWorkers() throws {
        let s = try Self.servers(["a", "b", "c"])
        defer { s.forEach { $0.stop() } }
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 2",
                services: [
                    serviceYAML(
                        servers: s.map { ($0.name, $0.port) },
                        serverExtra: ["a": "weight: 3", "b": "weight: 2", "c": "weight: 1"])
                ]))
        defer { p.stop() }
        let port = p.port("svc")
        var order: [String] = []
        for _ in 0..<60 {
            let h = try Self.open(port)
            order.append(h.server)
            close(h.fd)
        }
        // SO_REUSEPORT spreads these connections over both workers' listeners (by the client's
        // port); the order is still the smooth weighted one, period after period.
        for k in stride(from: 0, to: 60, by: 6) {
            #expect(
                Self.tally(order[k..<k + 6].map { Held(fd: -1, server: $0) }) == ["a": 3, "b": 2, "c": 1], "\(order)")
        }
        #expect(s.map(\.connections) == [30, 20, 10])
    }

    @Test("random (power of two choices): long connections spread by count")
    func random() throws {
        let s = try Self.servers(["a", "b", "c"])
        defer { s.forEach { $0.stop() } }
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(servers: s.map { ($0.name, $0.port) }, extra: "balance: random")
                ]))
        defer { p.stop() }
        let port = p.port("svc")
        var held = try (0..<30).map { _ in try Self.open(port) }
        let t = Self.tally(held)
        #expect(t.values.allSatisfy { $0 >= 7 && $0 <= 13 }, "\(t)")
        Self.release(held.filter { $0.server == "a" })
        held.removeAll { $0.server == "a" }
        let more = try (0..<10).map { _ in try Self.open(port) }
        // "a" is now empty: it wins every draw it takes part in.
        #expect(Self.tally(more)["a", default: 0] >= 5, "\(Self.tally(more))")
        Self.release(held + more)
    }

    @Test("source: each client address sticks to the server its Maglev slot names")
    func source() throws {
        let s = try Self.servers(["a", "b", "c"])
        defer { s.forEach { $0.stop() } }
        let p = try BallastProcess(
            config: configYAML(services: [
                serviceYAML(servers: s.map { ($0.name, $0.port) }, extra: "balance: source\nhash_table_size: 1009")
            ]))
        defer { p.stop() }
        let port = p.port("svc")
        let table = MaglevTable(names: ["a", "b", "c"], weights: [1, 1, 1], size: 1009)
        var seen = Set<String>()
        for k in 2..<20 {
            let source = "127.0.0.\(k)"
            var a = in_addr()
            inet_pton(AF_INET, source, &a)
            let expected = ["a", "b", "c"][
                Int(table.lookup(withUnsafeBytes(of: a.s_addr) { JHash.hash($0, seed: SourceHash.seed) }))]
            for _ in 0..<3 {
                let h = try Self.open(port, from: source)
                close(h.fd)
                #expect(h.server == expected, "client \(source)")
                seen.insert(h.server)
            }
        }
        #expect(seen.count == 3)
    }

    @Test("source-port: the port joins the hash, so one address spreads")
    func sourcePort() throws {
        let s = try Self.servers(["a", "b", "c"])
        defer { s.forEach { $0.stop() } }
        let p = try BallastProcess(
            config: configYAML(services: [
                serviceYAML(servers: s.map { ($0.name, $0.port) }, extra: "balance: source\nhash_key: source-port")
            ]))
        defer { p.stop() }
        var seen = Set<String>()
        for _ in 0..<30 {
            let h = try Self.open(p.port("svc"))
            close(h.fd)
            seen.insert(h.server)
        }
        #expect(seen.count == 3)
    }

    @Test("drain and maint by reload: no new connections, the open ones keep working", arguments: ["drain", "maint"])
    func drainAndMaint(state: String) throws {
        let s = try Self.servers(["a", "b"])
        defer { s.forEach { $0.stop() } }
        func config(_ aState: String) -> String {
            configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(servers: s.map { ($0.name, $0.port) }, serverExtra: ["a": "state: \(aState)"])
                ])
        }
        let p = try BallastProcess(config: config("ready"))
        defer { p.stop() }
        let port = p.port("svc")
        let first = try (0..<2).map { _ in try Self.open(port) }
        let onA = first.filter { $0.server == "a" }
        try #require(onA.count == 1)
        #expect(p.reload(config(state))?.contains("reloaded") == true)
        let after = try (0..<6).map { _ in try Self.open(port) }
        #expect(Self.tally(after) == ["b": 6])
        try Net.sendAll(onA[0].fd, "still here")
        #expect(Net.readExactly(onA[0].fd, 10) == Array("still here".utf8))
        Self.release(first + after)
        #expect(p.reload(config("ready"))?.contains("reloaded") == true)
        let back = try (0..<4).map { _ in try Self.open(port) }
        #expect(Self.tally(back) == ["a": 2, "b": 2])
        Self.release(back)
    }

    @Test("backups: the first only, or all with allbackups, when no active server is usable", arguments: [false, true])
    func allbackups(all: Bool) throws {
        let s = try Self.servers(["a", "b1", "b2"])
        defer { s.forEach { $0.stop() } }
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(
                        servers: s.map { ($0.name, $0.port) }, extra: "allbackups: \(all)",
                        serverExtra: ["a": "state: maint", "b1": "backup: true", "b2": "backup: true"])
                ]))
        defer { p.stop() }
        let held = try (0..<6).map { _ in try Self.open(p.port("svc")) }
        #expect(Self.tally(held) == (all ? ["b1": 3, "b2": 3] : ["b1": 6]))
        Self.release(held)
    }

    @Test("slow start: a server back from maint gets a small share first, its full share later")
    func slowstart() throws {
        let s = try Self.servers(["a", "b"])
        defer { s.forEach { $0.stop() } }
        func config(_ aState: String) -> String {
            configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(
                        servers: s.map { ($0.name, $0.port) }, extra: "slowstart: 3s",
                        serverExtra: ["a": "weight: 100, state: \(aState)", "b": "weight: 100"])
                ])
        }
        let p = try BallastProcess(config: config("maint"))
        defer { p.stop() }
        let port = p.port("svc")
        #expect(p.reload(config("ready"))?.contains("reloaded") == true)
        var early = [Held]()
        for _ in 0..<40 {
            let h = try Self.open(port)
            close(h.fd)
            early.append(h)
        }
        #expect(Self.tally(early)["a", default: 0] <= 8, "\(Self.tally(early))")
        usleep(3_200_000)
        var late = [Held]()
        for _ in 0..<40 {
            let h = try Self.open(port)
            close(h.fd)
            late.append(h)
        }
        #expect(Self.tally(late) == ["a": 20, "b": 20])
    }
}
