import Testing

@testable import BallastIO

#if canImport(Glibc)
    import Glibc
#endif

/// The io_uring engine's provided-buffer pool on a real ring and real sockets: it grows with
/// the receives in flight, keeps its size while the load goes up and down, and gives pages back
/// only after it had buffers to spare for a whole second.
struct RingPoolTests {
    /// One round: `k` receives in flight at once (each pair's peer sends a byte), every buffer
    /// given back after. Returns how many receives found no buffer.
    static func round(_ ring: Ring, _ pairs: [(Int32, Int32)], _ k: Int) throws -> Int {
        var waiting = Set(0..<k)
        var starved = 0
        for j in 0..<k { ring.recv(pairs[j].0, UInt64(j)) }
        for j in 0..<k { #expect(write(pairs[j].1, "x", 1) == 1) }
        var rounds = 0
        while !waiting.isEmpty && rounds < 1000 {
            rounds += 1
            try ring.submitAndWait(timeoutMs: 100)
            var done: [Int32] = []
            while true {
                let n = ring.reap()
                if n == 0 { break }
                for c in 0..<n {
                    let (data, res, buffer, _) = ring.completion(at: c)
                    let j = Int(data)
                    if res == -ENOBUFS {
                        starved += 1
                        #expect(ring.replenish(64))
                        ring.recv(pairs[j].0, data)
                        continue
                    }
                    #expect(res == 1 && buffer >= 0, "receive \(j): \(res)")
                    waiting.remove(j)
                    if buffer >= 0 { done.append(buffer) }
                }
            }
            // Given back after the whole round, as a send completing would.
            if waiting.isEmpty { for b in done { ring.recycle(b) } } else { pending += done }
        }
        for b in pending { ring.recycle(b) }
        pending.removeAll()
        #expect(waiting.isEmpty)
        return starved
    }
    nonisolated(unsafe) static var pending: [Int32] = []

    @Test(
        "the pool grows to the receives in flight, keeps its size under a load that varies, shrinks after a quiet second"
    )
    func poolFollowsTheLoad() throws {
        let ring = try Ring(entries: 512, bufferSize: 4096, maxBuffers: 1024)
        #expect(ring.grow(64))
        var pairs: [(Int32, Int32)] = []
        defer {
            for (a, b) in pairs {
                close(a)
                close(b)
            }
        }
        for _ in 0..<150 {
            var fds: [Int32] = [0, 0]
            #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
            pairs.append((fds[0], fds[1]))
        }
        var now: Int64 = 1_000_000
        ring.tick(now)
        // A load between 20 and 150 receives at once, 100 simulated ms a round, for 4 s.
        var starved = 0
        for r in 0..<40 {
            now += 100
            ring.tick(now)
            starved += try Self.round(ring, pairs, r % 2 == 0 ? 150 : 20)
        }
        let grown = ring.buffersInPool
        #expect(grown >= 150 && starved > 0, "pool \(grown), \(starved) receives found none free")
        #expect(ring.buffersReleased == 0, "gave back \(ring.buffersReleased) buffers under load")
        // The load falls to 5 at once: the surplus (beyond 64 free) goes back within seconds.
        for _ in 0..<40 {
            now += 100
            ring.tick(now)
            _ = try Self.round(ring, pairs, 5)
        }
        #expect(ring.buffersInPool <= 64 + 5 + 5, "pool \(ring.buffersInPool) after the load fell (was \(grown))")
        #expect(ring.buffersReleased == grown - ring.buffersInPool)
    }
}
