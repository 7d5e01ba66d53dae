#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Bob Jenkins' lookup3 hash exactly as the Linux kernel's `jhash()` (include/linux/jhash.h),
/// which nftables' `jhash` expression uses. Source hashing in proxy mode and in the kernel
/// (nat mode) therefore agree on where a client goes.
public enum JHash {
    public static let initval: UInt32 = 0xdead_beef

    @inline(__always)
    static func rol(_ x: UInt32, _ k: UInt32) -> UInt32 { (x << k) | (x >> (32 - k)) }

    @inline(__always)
    static func mix(_ a: inout UInt32, _ b: inout UInt32, _ c: inout UInt32) {
        a &-= c
        a ^= rol(c, 4)
        c &+= b
        b &-= a
        b ^= rol(a, 6)
        a &+= c
        c &-= b
        c ^= rol(b, 8)
        b &+= a
        a &-= c
        a ^= rol(c, 16)
        c &+= b
        b &-= a
        b ^= rol(a, 19)
        a &+= c
        c &-= b
        c ^= rol(b, 4)
        b &+= a
    }

    @inline(__always)
    static func final(_ a: inout UInt32, _ b: inout UInt32, _ c: inout UInt32) {
        c ^= b
        c &-= rol(b, 14)
        a ^= c
        a &-= rol(c, 11)
        b ^= a
        b &-= rol(a, 25)
        c ^= b
        c &-= rol(b, 16)
        a ^= c
        a &-= rol(c, 4)
        b ^= a
        b &-= rol(a, 14)
        c ^= b
        c &-= rol(b, 24)
    }

    /// `jhash(key, length, seed)`; 32-bit words are read in the CPU's byte order (little-endian
    /// here), as the kernel does.
    public static func hash(_ key: UnsafeRawBufferPointer, seed: UInt32) -> UInt32 {
        var length = key.count
        var a = initval &+ UInt32(truncatingIfNeeded: length) &+ seed
        var b = a
        var c = a
        var k = 0
        @inline(__always) func word(_ o: Int) -> UInt32 { key.loadUnaligned(fromByteOffset: o, as: UInt32.self) }
        @inline(__always) func byte(_ o: Int) -> UInt32 { UInt32(key[o]) }
        while length > 12 {
            a &+= word(k)
            b &+= word(k + 4)
            c &+= word(k + 8)
            mix(&a, &b, &c)
            length -= 12
            k += 12
        }
        if length == 0 { return c }
        if length >= 12 { c &+= byte(k + 11) << 24 }
        if length >= 11 { c &+= byte(k + 10) << 16 }
        if length >= 10 { c &+= byte(k + 9) << 8 }
        if length >= 9 { c &+= byte(k + 8) }
        if length >= 8 { b &+= byte(k + 7) << 24 }
        if length >= 7 { b &+= byte(k + 6) << 16 }
        if length >= 6 { b &+= byte(k + 5) << 8 }
        if length >= 5 { b &+= byte(k + 4) }
        if length >= 4 { a &+= byte(k + 3) << 24 }
        if length >= 3 { a &+= byte(k + 2) << 16 }
        if length >= 2 { a &+= byte(k + 1) << 8 }
        a &+= byte(k)
        final(&a, &b, &c)
        return c
    }

    public static func hash(_ bytes: [UInt8], seed: UInt32) -> UInt32 {
        bytes.withUnsafeBytes { hash($0, seed: seed) }
    }

    /// The kernel's `reciprocal_scale(val, n)`: maps a 32-bit hash onto 0..<n as nft's
    /// `jhash … mod n` does.
    @inline(__always)
    public static func scale(_ value: UInt32, _ n: UInt32) -> UInt32 {
        UInt32(truncatingIfNeeded: (UInt64(value) &* UInt64(n)) >> 32)
    }
}

/// What `balance: source` hashes: the client address (`hash_key: source`), or address and port
/// (`hash_key: source-port`), laid out as nftables registers hold them (address in network
/// order; the port in network order padded to 4 bytes), with seed `SourceHash.seed`.
public enum SourceHash {
    /// The documented seed: two Ballast instances (and nat mode) with the same servers agree.
    public static let seed: UInt32 = 0x0b41_1a57

    @inline(__always)
    public static func hash(_ storage: UnsafePointer<sockaddr_storage>, withPort: Bool) -> UInt32 {
        var key = (UInt64(0), UInt64(0), UInt64(0))  // up to 16 + 4 bytes
        return withUnsafeMutableBytes(of: &key) { buf -> UInt32 in
            var len = 0
            switch Int32(storage.pointee.ss_family) {
            case AF_INET:
                storage.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                    buf.storeBytes(of: sin.pointee.sin_addr.s_addr, toByteOffset: 0, as: UInt32.self)
                    len = 4
                    if withPort {
                        buf.storeBytes(of: sin.pointee.sin_port, toByteOffset: 4, as: UInt16.self)
                        len = 8
                    }
                }
            case AF_INET6:
                storage.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin in
                    withUnsafeBytes(of: sin.pointee.sin6_addr) { a in
                        for j in 0..<16 { buf[j] = a[j] }
                    }
                    len = 16
                    if withPort {
                        buf.storeBytes(of: sin.pointee.sin6_port, toByteOffset: 16, as: UInt16.self)
                        len = 20
                    }
                }
            default:
                return 0
            }
            return JHash.hash(UnsafeRawBufferPointer(rebasing: buf[0..<len]), seed: seed)
        }
    }
}
