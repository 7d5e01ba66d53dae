// schedbench — the cost of one server pick per balancing policy (2, 16 and 1,000 servers) and
// allocations per pick, and the time to rebuild a 65537-slot Maglev table. Prints markdown.
import BallastCore
import CMallocCount

#if canImport(Glibc)
    import Glibc
#endif

@inline(never)
func nowNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func pool(_ n: Int) -> ([Server], [ServerConfig]) {
    let configs = (0..<n).map { i in
        var c = ServerConfig(
            name: "server-\(i)",
            address: try! SocketAddress(parsing: "10.\(i / 65536).\((i / 256) % 256).\(i % 256):6379"),
            location: SourceLocation(file: "", line: 0, column: 0))
        c.weight = 1 + i % 4
        return c
    }
    return (configs.map { Server(config: $0) }, configs)
}

struct Result {
    var ns: Double
    var allocs: Double
}

func measure(_ policy: Balance, servers n: Int) -> Result {
    let (servers, configs) = pool(n)
    let backup = [Bool](repeating: false, count: n)
    let handles = servers.map { Unmanaged.passUnretained($0) }
    // The shared turn, as the proxy gives every service (roundrobin reads it).
    let scheduler = makeScheduler(
        policy, servers: configs, tableSize: MaglevTable.defaultSize, seed: 1, turn: SharedTurn())
    // Loads as a busy service would have them, so leastconn and random compare real numbers.
    for (i, s) in servers.enumerated() { s.active.store((i * 7) % 13, ordering: .relaxed) }
    let picks = n >= 1000 ? 20_000 : 1_000_000
    var sink = 0
    func run(_ count: Int, _ base: Int) {
        for k in 0..<count {
            sink &+=
                PickView.with(
                    servers: handles, backup: backup, tier: false, exclude: -1, now: 1_000,
                    staticWeights: policy == .source, hash: UInt32(truncatingIfNeeded: (base + k) &* 2_654_435_761)
                ) { scheduler.pick($0) } ?? 0
        }
        withExtendedLifetime(servers) {}
    }
    run(1000, 0)  // warm: Maglev builds its table on the first pick
    let m0 = ballast_malloc_count()
    let t0 = nowNs()
    run(picks, 1000)
    let t1 = nowNs()
    let m1 = ballast_malloc_count()
    if sink == -1 { print(sink) }
    return Result(ns: Double(t1 - t0) / Double(picks), allocs: Double(m1 - m0) / Double(picks))
}

func rebuild(servers n: Int) -> Double {
    let (_, configs) = pool(n)
    let names = configs.map(\.name)
    let weights = configs.map(\.weight)
    var times: [Double] = []
    for _ in 0..<5 {
        let t0 = nowNs()
        let t = MaglevTable(names: names, weights: weights, size: MaglevTable.defaultSize)
        let t1 = nowNs()
        if t.entries.isEmpty { print("empty") }
        times.append(Double(t1 - t0) / 1e6)
    }
    return times.sorted()[2]
}

let sizes = [2, 16, 1000]
print("| policy | " + sizes.map { "ns per pick, \($0) servers" }.joined(separator: " | ") + " | allocations per pick |")
print("|---|" + sizes.map { _ in "---:" }.joined(separator: "|") + "|---:|")
for policy in Balance.allCases {
    let results = sizes.map { measure(policy, servers: $0) }
    let allocs = results.map(\.allocs).max()!
    print(
        "| \(policy.rawValue) | " + results.map { String(format: "%.1f", $0.ns) }.joined(separator: " | ")
            + " | \(allocs == 0 ? "0" : String(format: "%.4f", allocs)) |")
}
print("")
print("| Maglev table rebuild, 65537 slots | ms (median of 5) |")
print("|---|---:|")
for n in [10, 1000] { print("| \(n) servers | \(String(format: "%.2f", rebuild(servers: n))) |") }
