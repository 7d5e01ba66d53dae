#if canImport(Glibc)
    import Glibc
#endif

func connect(_ port: UInt16) -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var sa = sockaddr_in()
    sa.sin_family = sa_family_t(AF_INET)
    sa.sin_port = port.bigEndian
    sa.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    var tv = timeval(tv_sec: 5, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    let r = withUnsafePointer(to: &sa) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    if r != 0 {
        close(fd)
        return -1
    }
    return fd
}

let ping: [UInt8] = Array("PING\r\n".utf8)

/// PING and wait for the 7-byte +PONG\r\n.
func pingPong(_ fd: Int32) -> Bool {
    guard ping.withUnsafeBytes({ send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }) == ping.count else {
        return false
    }
    var buf = [UInt8](repeating: 0, count: 64)
    var got = 0
    while got < 7 {
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, 64 - got, 0) }
        if n <= 0 { return false }
        got += n
    }
    return buf[0] == UInt8(ascii: "+")
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

final class Counter: @unchecked Sendable {
    var ok = 0
    var failed = 0
}

struct Job: @unchecked Sendable {
    let port: UInt16
    let deadline: Double
    let counter: UnsafeMutablePointer<Counter>
}

/// The connrate thread body: short connections until the deadline.
func connrateThread(_ arg: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let job = arg!.assumingMemoryBound(to: Job.self).pointee
    while now() < job.deadline {
        let fd = connect(job.port)
        if fd < 0 {
            job.counter.pointee.failed += 1
            continue
        }
        // Linger 0: no TIME_WAIT pile-up on the client side, so the run measures the proxy.
        var l = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        if pingPong(fd) { job.counter.pointee.ok += 1 } else { job.counter.pointee.failed += 1 }
        close(fd)
    }
    return nil
}
