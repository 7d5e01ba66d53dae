import BallastCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct AccessListTests {
    static func v4(_ a: UInt32) -> sockaddr_storage {
        var ss = sockaddr_storage()
        withUnsafeMutableBytes(of: &ss) { raw in
            raw.storeBytes(of: sa_family_t(AF_INET), toByteOffset: 0, as: sa_family_t.self)
            raw.storeBytes(of: a.bigEndian, toByteOffset: 4, as: UInt32.self)
        }
        return ss
    }

    static func text(_ a: UInt32) -> String { "\(a >> 24).\(a >> 16 & 255).\(a >> 8 & 255).\(a & 255)" }

    @Test("10,000 random networks: the prefix tree gives the verdict a linear scan gives, for 20,000 random addresses")
    func treeAgreesWithScan() throws {
        var rng = SystemRandomNumberGenerator()
        var allow: [(UInt32, Int)] = []
        var deny: [(UInt32, Int)] = []
        for k in 0..<10_000 {
            let len = Int.random(in: 8...32, using: &rng)
            let mask: UInt32 = len == 0 ? 0 : ~UInt32(0) << (32 - len)
            // half the space: misses happen
            let net = UInt32.random(in: 0...UInt32.max, using: &rng) & mask & 0x7FFF_FFFF
            if k % 10 == 0 { deny.append((net, len)) } else { allow.append((net, len)) }
        }
        let list = AccessList(
            allow: try allow.map { try IPPrefix(parsing: "\(Self.text($0.0))/\($0.1)") },
            deny: try deny.map { try IPPrefix(parsing: "\(Self.text($0.0))/\($0.1)") })
        func inAny(_ a: UInt32, _ nets: [(UInt32, Int)]) -> Bool {
            nets.contains { a & (~UInt32(0) << (32 - $0.1)) == $0.0 }
        }
        var seen: [AccessList.Verdict: Int] = [:]
        for k in 0..<20_000 {
            // Half the addresses inside a listed network, half anywhere.
            let a: UInt32
            if k % 2 == 0 {
                let (net, len) = allow.randomElement(using: &rng)!
                a = net | (len == 32 ? 0 : UInt32.random(in: 0...(~UInt32(0) >> len), using: &rng))
            } else {
                a = UInt32.random(in: 0...UInt32.max, using: &rng)
            }
            let expected: AccessList.Verdict = inAny(a, deny) ? .denied : inAny(a, allow) ? .admitted : .notAllowed
            let got = list.check(Self.v4(a))
            #expect(got == expected, "\(Self.text(a))")
            seen[got, default: 0] += 1
        }
        #expect(seen.count == 3, "all three verdicts occurred: \(seen)")
    }

    @Test func prefixes() throws {
        #expect(try IPPrefix(parsing: "10.0.0.0/8").description == "10.0.0.0/8")
        #expect(try IPPrefix(parsing: "10.1.2.3").description == "10.1.2.3/32")
        #expect(try IPPrefix(parsing: "2001:db8::/32").description == "2001:db8::/32")
        #expect(try IPPrefix(parsing: "[::1]").description == "::1/128")
        #expect(try IPPrefix(parsing: "0.0.0.0/0").covers(IPPrefix(parsing: "10.0.0.0/8")))
        #expect(throws: IPPrefix.ParseError.hostBits(given: "10.0.0.1/8", network: "10.0.0.0/8")) {
            try IPPrefix(parsing: "10.0.0.1/8")
        }
        #expect(throws: IPPrefix.ParseError.badLength("10.0.0.0/33")) { try IPPrefix(parsing: "10.0.0.0/33") }
        #expect(throws: IPPrefix.ParseError.badAddress("example.com")) { try IPPrefix(parsing: "example.com") }
    }

    @Test("IPv6 and IPv4-mapped clients")
    func v6() throws {
        let list = AccessList(allow: [try IPPrefix(parsing: "2001:db8::/32"), try IPPrefix(parsing: "10.0.0.0/8")])
        func v6(_ text: String) -> sockaddr_storage {
            var ss = sockaddr_storage()
            var a = in6_addr()
            _ = inet_pton(AF_INET6, text, &a)
            withUnsafeMutableBytes(of: &ss) { raw in
                raw.storeBytes(of: sa_family_t(AF_INET6), toByteOffset: 0, as: sa_family_t.self)
                withUnsafeBytes(of: a) {
                    raw.baseAddress!.advanced(by: 8).copyMemory(from: $0.baseAddress!, byteCount: 16)
                }
            }
            return ss
        }
        #expect(list.check(v6("2001:db8::1")) == .admitted)
        #expect(list.check(v6("2001:db9::1")) == .notAllowed)
        #expect(list.check(v6("::ffff:10.1.2.3")) == .admitted)
        #expect(list.check(v6("::ffff:11.1.2.3")) == .notAllowed)
    }

    @Test("per-client limits: open connections and a sliding rate, per address")
    func tracker() {
        let t = SourceTracker()
        var limits = SourceLimits()
        limits.connections = 2
        let a = Self.v4(0x0A00_0001)
        let b = Self.v4(0x0A00_0002)
        #expect(t.admit(a, limits: limits, now: 0) == nil)
        #expect(t.admit(a, limits: limits, now: 0) == nil)
        #expect(t.admit(a, limits: limits, now: 0) == .connectionLimit)
        #expect(t.admit(b, limits: limits, now: 0) == nil)
        t.release(a)
        #expect(t.admit(a, limits: limits, now: 0) == nil)
        var rate = SourceLimits()
        rate.rate = 10
        let r = SourceTracker()
        for _ in 0..<10 { #expect(r.admit(a, limits: rate, now: 500) == nil) }
        #expect(r.admit(a, limits: rate, now: 900) == .rateLimit)
        // Half into the next second, half of the last one still weighs: 5 more fit.
        for _ in 0..<5 { #expect(r.admit(a, limits: rate, now: 1500) == nil) }
        #expect(r.admit(a, limits: rate, now: 1500) == .rateLimit)
        for _ in 0..<15 { r.release(a) }
        r.sweep(now: 10_000, periodMs: 1000)
        #expect(r.tracked == 0)
    }
}
