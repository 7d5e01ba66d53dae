import BallastCore
import Foundation
import Testing

/// The config parser under random mutations of a valid config (bounded: 3,000 mutants or 20 s):
/// every mutant either loads or fails with a `ConfigError` that names this file and a line inside
/// it, and loading never crashes or hangs.
@Suite struct ConfigFuzzTests {
    static let seed = """
        global:
          workers: 2
          maxconn: 1000
          grace: 5s
          log: { level: info, format: text, connections: true }
          stats:
            timeout: 10s
            maxconn: 10
            sockets:
              - { path: /run/ballast/admin.sock, level: admin, mode: 600 }
              - { address: "127.0.0.1:9999", level: operator }
          metrics: { address: "127.0.0.1:9101" }
        defaults:
          timeout: { connect: 2s, client: 1m, server: 1m, queue: 5s }
          retries: 2
        services:
          - name: redis
            bind: ["127.0.0.1:6379", { address: "[::1]:6379", accept_proxy: true }]
            balance: source
            hash_key: source-port
            check: { type: redis, role: replica, interval: 500ms, rise: 2, fall: 3, max_lag: 5s }
            servers:
              - { name: r1, address: 10.0.0.11:6379, weight: 10 }
              - { name: r2, address: "10.0.0.12:6379", backup: true, state: drain }
          - name: web
            bind: "0.0.0.0:8080"
            balance: roundrobin
            slowstart: 30s
            maxqueue: 100
            check: { type: http, path: /health, expect: [200, 204] }
            servers:
              - { name: w1, address: 10.0.1.1:80, maxconn: 100, send_proxy: v2 }
              - { name: w2, address: "[2001:db8::2]:80", check: false }
          - name: db
            mode: nat
            bind: "10.0.0.100:3306"
            balance: source
            nat: { snat: masquerade }
            check: { type: mysql, user: haproxy, interval: 1s }
            servers:
              - { name: m1, address: 10.0.2.1:3306 }
              - { name: m2, address: 10.0.2.2:3306, weight: 0 }

        """

    static let pieces = [
        ":", " ", "\n", "\t", "-", "{", "}", "[", "]", ",", "\"", "'", "#", "&a", "*a", "!!str", "0", "-1", "65536",
        "99999999999999999999",
        "106751991167d", "0s", "1ms", "::", "0.0.0.0", "255.255.255.255", "224.0.0.1", "FRONTEND", "é", "\u{0}", "~",
        "null", "true", "|",
        ">", "%", "\\", "name: x", "address: 127.0.0.1:1", "- { name: z, address: 10.9.9.9:1 }",
    ]

    static func mutate(_ text: String, _ rng: inout some RandomNumberGenerator) -> String {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        for _ in 0..<Int.random(in: 1...3, using: &rng) {
            let i = Int.random(in: 0..<lines.count, using: &rng)
            var line = Array(lines[i])
            switch Int.random(in: 0..<6, using: &rng) {
            case 0:
                // Delete a run of characters.
                if !line.isEmpty {
                    let a = Int.random(in: 0..<line.count, using: &rng)
                    line.removeSubrange(a..<min(line.count, a + Int.random(in: 1...6, using: &rng)))
                }
            case 1:
                // Insert a piece.
                line.insert(
                    contentsOf: pieces.randomElement(using: &rng)!, at: Int.random(in: 0...line.count, using: &rng))
            case 2:
                // Replace a number or a word with a piece.
                if let k = line.indices.filter({ line[$0].isNumber || line[$0].isLetter }).randomElement(using: &rng) {
                    line.replaceSubrange(k...k, with: pieces.randomElement(using: &rng)!)
                }
            case 3:
                lines.insert(lines[i], at: i)  // a duplicated line (keys, services, servers)
            case 4:
                lines.remove(at: i)
                line = Array(lines[min(i, lines.count - 1)])
                lines[min(i, lines.count - 1)] = String(line)
                continue
            default:
                // Change the indentation.
                if Bool.random(using: &rng) { line.insert(" ", at: 0) } else if line.first == " " { line.removeFirst() }
            }
            lines[i] = String(line)
        }
        return lines.joined(separator: "\n")
    }

    @Test("3,000 mutants of a valid config: loaded, or refused with this file's name and a line in it")
    func mutants() throws {
        #expect(throws: Never.self) { try ConfigLoader.load(path: "fuzz.yaml", contents: Self.seed) }
        var rng = SystemRandomNumberGenerator()
        let lineCount = Self.seed.split(separator: "\n", omittingEmptySubsequences: false).count
        let end = Date().addingTimeInterval(20)
        var loaded = 0
        var refused = 0
        for _ in 0..<3000 where Date() < end {
            let text = Self.mutate(Self.seed, &rng)
            do {
                _ = try ConfigLoader.load(path: "fuzz.yaml", contents: text)
                loaded += 1
            } catch {
                refused += 1
                let loc = error.location
                #expect(loc.file == "fuzz.yaml" && loc.line >= 1 && loc.line <= lineCount + 4, "\(error)\n---\n\(text)")
                #expect(!error.message.isEmpty)
            }
        }
        print("config fuzz: \(loaded) mutants loaded, \(refused) refused")
        #expect(loaded + refused >= 500)
        // Mutations that break the config are common, and so are ones it survives: both paths ran.
        #expect(loaded > 0 && refused > 0)
    }
}
