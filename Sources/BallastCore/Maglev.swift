/// Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size M in
/// which every server owns a share of slots proportional to its weight. Removing a server moves
/// mostly that server's slots; adding it back restores the exact same table.
///
/// Deterministic by construction, so two balancers (and nat mode's kernel map) with the same
/// servers build the same table: each server's permutation comes from `JHash` of its name with
/// two fixed seeds (`offsetSeed`, `skipSeed`), servers fill slots in config order, and in each
/// round a server claims as many slots as its weight (weights divided by their common divisor).
public struct MaglevTable: Equatable, Sendable {
    public static let defaultSize = 65537
    public static let offsetSeed: UInt32 = 0x6d61_676c  // "magl"
    public static let skipSeed: UInt32 = 0x6576_3136  // "ev16"

    public let size: Int
    /// Slot → server index (into the list given to `init`), or -1 when no server is usable.
    public private(set) var entries: [Int32]

    /// - Parameters:
    ///   - names: every server's name (their identity in the hash), in config order.
    ///   - weights: per server; 0 leaves the server out of the table.
    public init(names: [String], weights: [Int], size: Int = MaglevTable.defaultSize) {
        precondition(names.count == weights.count)
        self.size = size
        entries = [Int32](repeating: -1, count: size)
        let live = weights.indices.filter { weights[$0] > 0 }
        guard !live.isEmpty else { return }
        var g = 0
        for i in live { g = gcd(g, weights[i]) }
        let m = UInt64(size)
        var offset = [UInt64](repeating: 0, count: names.count)
        var skip = [UInt64](repeating: 0, count: names.count)
        for i in live {
            let bytes = Array(names[i].utf8)
            offset[i] = UInt64(JHash.hash(bytes, seed: MaglevTable.offsetSeed)) % m
            skip[i] = UInt64(JHash.hash(bytes, seed: MaglevTable.skipSeed)) % (m - 1) + 1
        }
        var next = [UInt64](repeating: 0, count: names.count)
        var filled = 0
        entries.withUnsafeMutableBufferPointer { table in
            while true {
                for i in live {
                    for _ in 0..<(weights[i] / g) {
                        var c = Int((offset[i] &+ next[i] &* skip[i]) % m)
                        while table[c] >= 0 {
                            next[i] += 1
                            c = Int((offset[i] &+ next[i] &* skip[i]) % m)
                        }
                        table[c] = Int32(i)
                        next[i] += 1
                        filled += 1
                        if filled == size { return }
                    }
                }
            }
        }
    }

    @inline(__always)
    public func lookup(_ hash: UInt32) -> Int32 { entries[Int(JHash.scale(hash, UInt32(size)))] }

    /// A digest of the table, for comparing tables across processes (`ballast debug maglev`).
    public var digest: UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for e in entries {
            withUnsafeBytes(of: e.littleEndian) { for b in $0 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 } }
        }
        return h
    }

    public static func isPrime(_ n: Int) -> Bool {
        if n < 2 { return false }
        if n % 2 == 0 { return n == 2 }
        var d = 3
        while d * d <= n {
            if n % d == 0 { return false }
            d += 2
        }
        return true
    }
}

func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }
