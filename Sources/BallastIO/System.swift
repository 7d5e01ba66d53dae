import CLinux

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A failed system call: its name and errno. Thrown with typed throws, so no allocation.
public struct SysError: Error, Sendable, Equatable, CustomStringConvertible {
    public var call: StaticString
    public var errno: Int32

    public init(_ call: StaticString, _ errno: Int32) {
        self.call = call
        self.errno = errno
    }

    public static func == (a: SysError, b: SysError) -> Bool { a.errno == b.errno && "\(a.call)" == "\(b.call)" }

    public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

/// The result of a nonblocking call: a value, or "try again when the fd is ready".
public enum IOResult<T>: Equatable where T: Equatable {
    case done(T)
    case wouldBlock
}

/// One place owns the syscalls (after swift-nio's `System.swift`): each wrapper loops on EINTR,
/// turns EAGAIN into `.wouldBlock`, treats EBADF/EFAULT as programmer errors, and throws the rest
/// with the call's name.
public enum Sys {
    @inline(__always)
    static func check(_ call: StaticString, _ body: () -> Int) throws(SysError) -> IOResult<Int> {
        while true {
            let r = body()
            if r >= 0 { return .done(r) }
            let e = Glibc.errno
            switch e {
            case EINTR: continue
            case EAGAIN: return .wouldBlock
            case EBADF, EFAULT:
                preconditionFailure("\(call) failed with \(String(cString: strerror(e))): a bug in Ballast")
            default: throw SysError(call, e)
            }
        }
    }

    @inline(__always)
    static func checkBlocking(_ call: StaticString, _ body: () -> Int) throws(SysError) -> Int {
        while true {
            let r = body()
            if r >= 0 { return r }
            let e = Glibc.errno
            if e == EINTR { continue }
            if e == EBADF || e == EFAULT {
                preconditionFailure("\(call) failed with \(String(cString: strerror(e))): a bug in Ballast")
            }
            throw SysError(call, e)
        }
    }

    /// Closes a descriptor. EINTR after close still closed it on Linux, so it is not retried.
    /// The corresponding C function is `close`.
    @inline(never)
    public static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    /// The corresponding C function is `recv`.
    @inline(never)
    public static func recv(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ len: Int) throws(SysError) -> IOResult<Int> {
        try check("recv") { Glibc.recv(fd, buf, len, 0) }
    }

    /// Reads without consuming: the bytes stay in the socket for the next `recv`. The
    /// corresponding C function is `recv(MSG_PEEK)`.
    @inline(never)
    public static func peek(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ len: Int) throws(SysError) -> IOResult<Int> {
        try check("recv") { Glibc.recv(fd, buf, len, Int32(MSG_PEEK)) }
    }

    /// Sends without raising SIGPIPE. The corresponding C function is `send`.
    @inline(never)
    public static func send(_ fd: Int32, _ buf: UnsafeRawPointer, _ len: Int) throws(SysError) -> IOResult<Int> {
        try check("send") { Glibc.send(fd, buf, len, Int32(MSG_NOSIGNAL)) }
    }

    /// Moves up to `len` bytes between a socket and a pipe without copying them to userspace.
    /// The corresponding C function is `splice`.
    @inline(never)
    public static func splice(from: Int32, to: Int32, _ len: Int) throws(SysError) -> IOResult<Int> {
        try check("splice") { ballast_splice(from, to, len) }
    }

    /// Writes every byte to a blocking descriptor (standard error, a file, a blocking socket),
    /// retrying after EINTR and partial writes; false when the descriptor fails. The one
    /// write-all loop of the code base. The corresponding C function is `write`.
    @discardableResult
    public static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + off, $0.count - off) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    /// Reads from a blocking descriptor: the byte count (0 at EOF), retried after EINTR. A
    /// receive timeout (`SO_RCVTIMEO`) shows as `.wouldBlock`. The corresponding C function is `read`.
    public static func readBlocking(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ len: Int) throws(SysError)
        -> IOResult<Int>
    {
        while true {
            let n = Glibc.read(fd, buf, len)
            if n >= 0 { return .done(n) }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return .wouldBlock }
            throw SysError("read", errno)
        }
    }

    /// The corresponding C function is `shutdown(fd, SHUT_WR)`.
    @inline(never)
    public static func shutdownWrite(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
    }

    /// The corresponding C function is `shutdown(fd, SHUT_RDWR)`.
    public static func shutdownBoth(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    /// Gives the pages of `[p, p + size)` (page-aligned) back to the system; the memory stays
    /// mapped and reads as zeros (`madvise(MADV_DONTNEED)`).
    public static func discardPages(_ p: UnsafeMutableRawPointer, _ size: Int) {
        _ = madvise(p, size, MADV_DONTNEED)
    }
}
