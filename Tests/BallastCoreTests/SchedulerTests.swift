import Testing

@testable import BallastCore

struct SchedulerTests {
    @Test("smooth weighted round robin gives each server exactly its weight per cycle",
        arguments: [[1], [1, 1], [5, 1, 1], [3, 2], [1, 0, 4], [256, 1, 17, 9]])
    func exactShares(weights: [Int]) {
        let rr = SmoothWeightedRoundRobin(weights: weights)
        let total = weights.reduce(0, +)
        var counts = [Int](repeating: 0, count: weights.count)
        for _ in 0..<(total * 100) { counts[rr.pick { _ in true }!] += 1 }
        #expect(counts == weights.map { $0 * 100 })
    }

    @Test("picks are spread, not bursts: 5,1,1 gives a a b a c a a")
    func smooth() {
        let rr = SmoothWeightedRoundRobin(weights: [5, 1, 1])
        let seq = (0..<7).map { _ in ["a", "b", "c"][rr.pick { _ in true }!] }
        #expect(seq == ["a", "a", "b", "a", "c", "a", "a"])
    }

    @Test("ineligible servers are skipped and the rest keep their ratio")
    func skipsIneligible() {
        let rr = SmoothWeightedRoundRobin(weights: [2, 1, 1])
        var counts = [0, 0, 0]
        for _ in 0..<300 { counts[rr.pick { $0 != 0 }!] += 1 }
        #expect(counts == [0, 150, 150])
        #expect(rr.pick { _ in false } == nil)
    }

    @Test("a weight change shifts the share without a burst to one server")
    func weightChange() {
        let rr = SmoothWeightedRoundRobin(weights: [1, 1])
        for _ in 0..<11 { _ = rr.pick { _ in true } }
        rr.setWeight(1, 3)
        var run = 0
        var longest = 0
        var last = -1
        var counts = [0, 0]
        for _ in 0..<400 {
            let p = rr.pick { _ in true }!
            counts[p] += 1
            run = p == last ? run + 1 : 1
            last = p
            longest = max(longest, run)
        }
        #expect(counts == [100, 300])
        #expect(longest <= 3)
    }
}
