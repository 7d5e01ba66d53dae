/// How a service picks a server for a new connection.
public enum Balance: String, Sendable, CaseIterable {
    case roundrobin

    /// Policies from DESIGN.md that a later release adds (leastconn, source/Maglev, random, first).
    public static let planned: Set<String> = ["leastconn", "source", "random", "first"]
}

/// A per-worker scheduling policy. Each worker owns one instance per service, so picking takes no
/// lock; the shared facts (state, active connections) are read through `isEligible`.
///
/// The seam for new policies: implement `pick`, add a case to `Balance` and to `makeScheduler`.
public protocol Scheduler: AnyObject {
    /// Picks among `servers` (indices into the service's server list) for which `isEligible` holds.
    /// Returns nil when none is eligible. Must not allocate.
    func pick(_ isEligible: (Int) -> Bool) -> Int?
}

public func makeScheduler(_ balance: Balance, weights: [Int]) -> Scheduler {
    switch balance {
    case .roundrobin: return SmoothWeightedRoundRobin(weights: weights)
    }
}

/// nginx's smooth weighted round robin: every pick adds each eligible server's weight to its
/// running score, takes the highest score and subtracts the total. Weights 5,1,1 give
/// a a b a c a a — spread out, never a burst of one server — and over any window of
/// sum(weights) picks each server gets exactly its weight.
public final class SmoothWeightedRoundRobin: Scheduler {
    private var weights: [Int]
    private var current: [Int]

    public init(weights: [Int]) {
        self.weights = weights
        self.current = [Int](repeating: 0, count: weights.count)
    }

    /// Changes one server's weight without resetting the others' scores, so a runtime change
    /// shifts the share gradually instead of sending a burst to one server.
    public func setWeight(_ index: Int, _ weight: Int) {
        weights[index] = weight
        if weight == 0 { current[index] = 0 }
    }

    public func pick(_ isEligible: (Int) -> Bool) -> Int? {
        var total = 0
        var best = -1
        var bestScore = Int.min
        for i in 0..<weights.count {
            let w = weights[i]
            if w == 0 || !isEligible(i) { continue }
            current[i] &+= w
            total &+= w
            if current[i] > bestScore {
                bestScore = current[i]
                best = i
            }
        }
        guard best >= 0 else { return nil }
        current[best] &-= total
        return best
    }
}
