/// A hashed timing wheel over connection slots: one timer per connection, linked through
/// `Conn.timerNext/timerPrev`, so arming, moving and cancelling allocate nothing.
/// Ticks are `tickMs` wide; a deadline beyond one turn of the wheel stays in its slot until due.
struct TimerWheel {
    static let tickMs: Int64 = 10
    static let slotCount = 1024
    private(set) var heads: [Int32]
    private var currentTick: Int64
    private(set) var count = 0

    init(now: Int64) {
        heads = [Int32](repeating: -1, count: TimerWheel.slotCount)
        currentTick = now / TimerWheel.tickMs
    }

    @inline(__always)
    static func slot(_ tick: Int64) -> Int { Int(tick & Int64(slotCount - 1)) }

    mutating func arm(_ i: Int32, at dueMs: Int64, in table: ConnTable) {
        let c = table[i]
        if c.pointee.timerArmed { disarm(i, in: table) }
        // Never schedule into the past of the wheel: a due time already passed fires on the next tick.
        let tick = max(dueMs / TimerWheel.tickMs + ((dueMs % TimerWheel.tickMs) == 0 ? 0 : 1), currentTick + 1)
        let s = TimerWheel.slot(tick)
        c.pointee.timerDue = dueMs
        c.pointee.timerSlot = Int32(s)
        c.pointee.timerArmed = true
        c.pointee.timerPrev = -1
        c.pointee.timerNext = heads[s]
        if heads[s] >= 0 { table[heads[s]].pointee.timerPrev = i }
        heads[s] = i
        count += 1
    }

    mutating func disarm(_ i: Int32, in table: ConnTable) {
        let c = table[i]
        guard c.pointee.timerArmed else { return }
        let s = Int(c.pointee.timerSlot)
        let next = c.pointee.timerNext
        let prev = c.pointee.timerPrev
        if prev >= 0 {
            table[prev].pointee.timerNext = next
        } else {
            heads[s] = next
        }
        if next >= 0 { table[next].pointee.timerPrev = prev }
        c.pointee.timerArmed = false
        c.pointee.timerNext = -1
        c.pointee.timerPrev = -1
        count -= 1
    }

    /// Milliseconds until the next tick when anything is armed, else nil.
    func timeoutMs(now: Int64) -> Int32? {
        guard count > 0 else { return nil }
        let next = (currentTick + 1) * TimerWheel.tickMs
        return Int32(max(0, min(next - now, 1000)))
    }

    /// Collects every entry due at or before `now` into `expired` (disarming it).
    mutating func advance(now: Int64, in table: ConnTable, into expired: inout [Int32]) {
        let target = now / TimerWheel.tickMs
        guard count > 0 else {
            currentTick = target
            return
        }
        // Visiting more than a full turn is pointless: every slot has been seen once.
        var tick = max(currentTick, target - Int64(TimerWheel.slotCount) + 1)
        while tick <= target {
            let s = TimerWheel.slot(tick)
            var i = heads[s]
            while i >= 0 {
                let next = table[i].pointee.timerNext
                if table[i].pointee.timerDue <= now {
                    disarm(i, in: table)
                    expired.append(i)
                }
                i = next
            }
            tick += 1
        }
        currentTick = target
    }
}
