import Foundation
import Testing

@testable import BallastCore

/// Servers built from configs, and a view over them, for driving schedulers without a proxy.
struct Pool {
    let servers: [Server]
    let backup: [Bool]
    /// Shared by the pool's servers, as a table's are.
    let states = ServerStates()

    init(weights: [Int], backups: Set<Int> = []) {
        let states = self.states
        servers = weights.enumerated().map { i, w in
            var c = ServerConfig(
                name: "s\(i)", address: try! SocketAddress(parsing: "10.0.0.\(i + 1):80"),
                location: SourceLocation(file: "", line: 0, column: 0))
            c.weight = w
            return Server(config: c, states: states)
        }
        backup = weights.indices.map { backups.contains($0) }
    }

    /// Picks once through a view over this pool.
    func pick(
        _ s: Scheduler, hash: UInt32 = 0, tier: Bool = false, exclude: Int = -1, tried: UInt64 = 0, now: Int64 = 1000,
        staticWeights: Bool = false
    ) -> Int? {
        PickView.with(
            servers: servers.map { Unmanaged.passUnretained($0) }, backup: backup, tier: tier, exclude: exclude,
            tried: tried,
            now: now, staticWeights: staticWeights, hash: hash, version: states.version.load(ordering: .acquiring)
        ) { s.pick($0) }
    }

    /// `n` picks; with `hold`, each pick stays connected (counts as load) until the end.
    func distribution(
        _ s: Scheduler, _ n: Int, hold: Bool = false, hashes: ((Int) -> UInt32)? = nil, staticWeights: Bool = false
    ) -> [Int] {
        var counts = [Int](repeating: 0, count: servers.count)
        for k in 0..<n {
            let i = pick(s, hash: hashes?(k) ?? 0, staticWeights: staticWeights)!
            counts[i] += 1
            if hold { servers[i].active.wrappingAdd(1, ordering: .relaxed) }
        }
        if hold { for (i, c) in counts.enumerated() { servers[i].active.wrappingSubtract(c, ordering: .relaxed) } }
        return counts
    }
}

struct SchedulerTests {
    static let weightSets: [[Int]] = [
        [1], [1, 1], [5, 1, 1], [3, 2], [1, 0, 4], [256, 1, 17, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    ]

    static func shares(_ w: [Int]) -> [Double] {
        let t = Double(w.reduce(0, +))
        return w.map { Double($0) / t }
    }

    /// Every share within 1 % (absolute) of the weighted share.
    static func withinOnePercent(_ counts: [Int], _ weights: [Int]) -> Bool {
        let n = Double(counts.reduce(0, +))
        return zip(counts, shares(weights)).allSatisfy { abs(Double($0) / n - $1) <= 0.01 }
    }

    @Test("roundrobin: exactly the weighted share", arguments: weightSets)
    func roundrobinExact(weights: [Int]) {
        let pool = Pool(weights: weights)
        let total = weights.reduce(0, +)
        let counts = pool.distribution(SmoothWeightedRoundRobin(count: weights.count), total * 1000)
        #expect(counts == weights.map { $0 * 1000 })
    }

    @Test(
        "roundrobin with a shared turn: two workers' picks, interleaved at random, follow one smooth order",
        arguments: weightSets)
    func sharedTurn(weights: [Int]) {
        let pool = Pool(weights: weights)
        let turn = SharedTurn()
        let workers = [
            SmoothWeightedRoundRobin(count: weights.count, turn: turn),
            SmoothWeightedRoundRobin(count: weights.count, turn: turn),
        ]
        let total = weights.reduce(0, +)
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        var merged: [Int] = []
        for _ in 0..<total * 100 {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            merged.append(pool.pick(workers[Int(state >> 63)])!)
        }
        var counts = [Int](repeating: 0, count: weights.count)
        for i in merged { counts[i] += 1 }
        #expect(counts == weights.map { $0 * 100 })
        // The very order one scheduler alone would give.
        let alone = SmoothWeightedRoundRobin(count: weights.count)
        #expect(merged == (0..<merged.count).map { _ in pool.pick(alone)! })
    }

    @Test("roundrobin with a shared turn follows state and weight changes at the next pick")
    func sharedTurnChanges() {
        let pool = Pool(weights: [1, 1, 1], backups: [2])
        let turn = SharedTurn()
        let a = SmoothWeightedRoundRobin(count: 3, turn: turn)
        let b = SmoothWeightedRoundRobin(count: 3, turn: turn)
        #expect([pool.pick(a), pool.pick(b), pool.pick(a), pool.pick(b)] == [0, 1, 0, 1])
        pool.servers[1].setWeight(3, now: 1)
        var counts = [0, 0, 0]
        for k in 0..<400 { counts[pool.pick(k % 3 == 0 ? a : b)!] += 1 }
        #expect(counts == [100, 300, 0])
        pool.servers[0].setAdmin(.drain, now: 1)
        #expect((0..<10).map { _ in pool.pick(a)! } == Array(repeating: 1, count: 10))
        pool.servers[1].setAdmin(.maint, now: 1)
        #expect(pool.pick(b) == nil)  // active tier empty
        #expect(pool.pick(b, tier: true) == 2)
        #expect(pool.pick(a, tier: true, exclude: 2) == nil)  // redispatch away from the only backup
    }

    @Test(
        "a retry never picks a server already tried while another is usable, for every balance",
        arguments: Balance.allCases)
    func retrySkipsTried(balance: Balance) {
        let pool = Pool(weights: [1, 1, 1, 1])
        let configs = (0..<4).map {
            ServerConfig(
                name: "s\($0)", address: try! SocketAddress(parsing: "10.0.0.\($0 + 1):1"),
                location: SourceLocation(file: "t", line: 1, column: 1))
        }
        let s = makeScheduler(balance, servers: configs, tableSize: 65537, seed: 7, turn: SharedTurn())
        for h in 0..<200 {
            // s0 and s1 failed, s2 just failed: only s3 is left untried.
            let got = pool.pick(s, hash: UInt32(h) &* 2_654_435_761, exclude: 2, tried: 0b0111)
            #expect(got == 3, "\(balance): pick \(String(describing: got)) for hash \(h)")
        }
    }

    @Test("leastconn with long connections: shares follow weights", arguments: weightSets)
    func leastconnShares(weights: [Int]) {
        let pool = Pool(weights: weights)
        let counts = pool.distribution(LeastConnections(count: weights.count), 100_000, hold: true)
        #expect(Self.withinOnePercent(counts, weights), "\(counts)")
    }

    @Test("random (power of two choices): shares follow weights", arguments: weightSets)
    func randomShares(weights: [Int]) {
        let pool = Pool(weights: weights)
        let counts = pool.distribution(PowerOfTwoChoices(count: weights.count, seed: 42), 100_000, hold: true)
        #expect(Self.withinOnePercent(counts, weights), "\(counts)")
    }

    @Test("source (Maglev): 100,000 client addresses spread by weight", arguments: weightSets)
    func sourceShares(weights: [Int]) {
        let pool = Pool(weights: weights)
        let s = MaglevScheduler(names: pool.servers.map(\.name), tableSize: 65537)
        let counts = pool.distribution(
            s, 100_000,
            hashes: { k in
                var a = UInt32(0x0A00_0000 + k).bigEndian
                return withUnsafeBytes(of: &a) { JHash.hash($0, seed: SourceHash.seed) }
            }, staticWeights: true)
        #expect(Self.withinOnePercent(counts, weights), "\(counts)")
    }

    @Test("first: everything to the first server until it is full, then the next")
    func firstAvailable() {
        var configs = Pool(weights: [1, 1, 1])
        let f = FirstAvailable(count: 3)
        #expect(configs.distribution(f, 1000) == [1000, 0, 0])
        configs.servers[0].maxconnValue.store(10, ordering: .relaxed)
        configs.servers[1].maxconnValue.store(5, ordering: .relaxed)
        #expect(configs.distribution(f, 20, hold: true) == [10, 5, 5])
        configs = Pool(weights: [0, 1, 1])
        #expect(configs.distribution(f, 10) == [0, 10, 0])
    }

    @Test("leastconn: ties rotate; the least loaded relative to weight wins")
    func leastconnTies() {
        let pool = Pool(weights: [1, 1, 2])
        let lc = LeastConnections(count: 3)
        #expect((0..<6).map { _ in pool.pick(lc)! } == [0, 1, 2, 0, 1, 2])
        pool.servers[0].active.store(3, ordering: .relaxed)
        pool.servers[1].active.store(1, ordering: .relaxed)
        pool.servers[2].active.store(3, ordering: .relaxed)  // 3/2 = 1.5 > 1/1
        #expect(pool.pick(lc) == 1)
        pool.servers[2].active.store(1, ordering: .relaxed)  // 1/2 < 1/1
        #expect(pool.pick(lc) == 2)
    }

    @Test("smooth: 5,1,1 gives a a b a c a a")
    func smooth() {
        let pool = Pool(weights: [5, 1, 1])
        let rr = SmoothWeightedRoundRobin(count: 3)
        #expect((0..<7).map { _ in ["a", "b", "c"][pool.pick(rr)!] } == ["a", "a", "b", "a", "c", "a", "a"])
    }

    @Test(
        "a runtime weight change takes effect at the next pick without a burst to one server",
        arguments: [Balance.roundrobin, .leastconn, .random])
    func weightChange(policy: Balance) {
        let pool = Pool(weights: [1, 1])
        let configs = pool.servers.map {
            ServerConfig(name: $0.name, address: $0.address, location: SourceLocation(file: "", line: 0, column: 0))
        }
        let sched = makeScheduler(policy, servers: configs, tableSize: 0, seed: 7)
        _ = pool.distribution(sched, 11, hold: false)
        pool.servers[1].setWeight(3, now: 1)
        let counts = pool.distribution(sched, 40_000, hold: true)
        #expect(Self.withinOnePercent(counts, [1, 3]), "\(counts)")
        if policy == .roundrobin {
            var run = 0
            var longest = 0
            var last = -1
            for _ in 0..<400 {
                let p = pool.pick(sched)!
                run = p == last ? run + 1 : 1
                last = p
                longest = max(longest, run)
            }
            #expect(longest <= 3)
        }
    }

    @Test("drain, maint and weight 0 take no new connections; backups only when no active is usable")
    func states() {
        let pool = Pool(weights: [1, 1, 1], backups: [2])
        let rr = SmoothWeightedRoundRobin(count: 3)
        pool.servers[0].setAdmin(.drain, now: 1)
        #expect(pool.distribution(rr, 10) == [0, 10, 0])
        pool.servers[1].setAdmin(.maint, now: 1)
        #expect(pool.pick(rr) == nil)  // active tier empty
        #expect(pool.pick(rr, tier: true) == 2)
    }

    @Test("slow start ramps the effective weight linearly after a server comes back")
    func slowstart() {
        var c = ServerConfig(
            name: "s", address: try! SocketAddress(parsing: "10.0.0.1:80"),
            location: SourceLocation(file: "", line: 0, column: 0))
        c.weight = 100
        c.slowstart = Millis(10_000)
        let s = Server(config: c)
        #expect(s.effectiveWeight(now: 5000) == 100)  // never went down: full weight
        s.setAdmin(.maint, now: 1000)
        s.setAdmin(.ready, now: 2000)
        #expect(s.effectiveWeight(now: 2000) == 1)
        #expect(s.effectiveWeight(now: 4500) == 25)
        #expect(s.effectiveWeight(now: 7000) == 50)
        #expect(s.effectiveWeight(now: 12_000) == 100)
    }
}

struct MaglevTests {
    static func names(_ n: Int) -> [String] { (0..<n).map { "server-\($0)" } }

    static func counts(_ t: MaglevTable, _ n: Int) -> [Int] {
        var c = [Int](repeating: 0, count: n)
        for e in t.entries where e >= 0 { c[Int(e)] += 1 }
        return c
    }

    @Test(
        "slot counts differ by at most one slot per unit weight",
        arguments: [[1, 1, 1], [1, 2, 3], [5, 1, 1, 1], [7, 3], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [100, 1]])
    func balanced(weights: [Int]) {
        let t = MaglevTable(names: Self.names(weights.count), weights: weights)
        let c = Self.counts(t, weights.count)
        #expect(c.reduce(0, +) == 65537)
        let perWeight = zip(c, weights).map { Double($0) / Double($1) }
        #expect(perWeight.max()! - perWeight.min()! <= 1.0, "\(c)")
    }

    @Test("removing one of ten servers moves under 1 % of the others' slots; adding it back restores the table")
    func minimalDisruption() {
        let names = Self.names(10)
        let full = MaglevTable(names: names, weights: [Int](repeating: 1, count: 10))
        for removed in 0..<10 {
            var w = [Int](repeating: 1, count: 10)
            w[removed] = 0
            let less = MaglevTable(names: names, weights: w)
            var moved = 0
            var others = 0
            for k in 0..<full.size where full.entries[k] != Int32(removed) {
                others += 1
                if less.entries[k] != full.entries[k] { moved += 1 }
            }
            #expect(Double(moved) / Double(others) < 0.01, "removing \(removed) moved \(moved) of \(others)")
            #expect(!less.entries.contains(Int32(removed)))
        }
        #expect(MaglevTable(names: names, weights: [Int](repeating: 1, count: 10)) == full)
    }

    @Test("two tables built in separate processes are identical")
    func crossProcess() throws {
        let names = Self.names(10)
        let here = MaglevTable(names: names, weights: [3, 1, 1, 2, 1, 1, 1, 5, 1, 1]).digest
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let bin = root.appendingPathComponent(".build/debug/ballast").path
        var outputs: [String] = []
        for _ in 0..<2 {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: bin)
            p.arguments =
                ["debug", "maglev", "--size", "65537"]
                + zip(names, [3, 1, 1, 2, 1, 1, 1, 5, 1, 1]).map { "\($0):\($1)" }
            let pipe = Pipe()
            p.standardOutput = pipe
            try p.run()
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            outputs.append(String(decoding: data, as: UTF8.self))
        }
        #expect(outputs[0] == outputs[1])
        #expect(outputs[0].contains("digest \(String(here, radix: 16))"), "\(outputs[0])")
    }

    @Test("jhash matches the kernel's jhash()")
    func jhashVectors() {
        // Reference values from the kernel's jhash() (lookup3 hashlittle with the kernel's
        // 0xdeadbeef + length + seed start), computed independently.
        #expect(JHash.hash([], seed: 0) == 0xdead_beef)
        #expect(JHash.hash(Array("Four score and seven years ago".utf8), seed: 0) == 0x1777_0551)
        #expect(JHash.hash(Array("Four score and seven years ago".utf8), seed: 1) == 0xcd62_8161)
    }
}
