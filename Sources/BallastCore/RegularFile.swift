#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Reading the files a config names (the config itself, password files, the state file) with a
/// bound: only a regular file, never more than `limit` bytes. A FIFO, a device or a directory is
/// refused at once instead of blocking the reader or filling memory (`/dev/zero`).
public enum RegularFile {
    public enum Failure: Error, Equatable, CustomStringConvertible {
        case cannotOpen(errno: Int32)
        case notRegular(String)
        case tooLarge(limit: Int)
        case cannotRead(errno: Int32)

        public var description: String {
            switch self {
            case .cannotOpen(let e), .cannotRead(let e): return String(cString: strerror(e))
            case .notRegular(let kind): return "not a regular file (\(kind))"
            case .tooLarge(let limit): return "larger than \(limit >> 20) MiB"
            }
        }
    }

    /// Config files, and anything else read whole: 16 MiB.
    public static let defaultLimit = 16 << 20

    public static func read(_ path: String, limit: Int = defaultLimit) -> Result<[UInt8], Failure> {
        // Non-blocking open: opening a FIFO with no writer must not wait.
        let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return .failure(.cannotOpen(errno: errno)) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return .failure(.cannotRead(errno: errno)) }
        switch st.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFIFO: return .failure(.notRegular("a FIFO"))
        case S_IFDIR: return .failure(.notRegular("a directory"))
        case S_IFCHR: return .failure(.notRegular("a character device"))
        case S_IFBLK: return .failure(.notRegular("a block device"))
        case S_IFSOCK: return .failure(.notRegular("a socket"))
        default: return .failure(.notRegular("not a file"))
        }
        if Int(st.st_size) > limit { return .failure(.tooLarge(limit: limit)) }
        var data = [UInt8]()
        data.reserveCapacity(Int(st.st_size))
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                return .failure(.cannotRead(errno: errno))
            }
            if n == 0 { break }
            // The file may grow while it is read: the bound holds all the same.
            if data.count + n > limit { return .failure(.tooLarge(limit: limit)) }
            data.append(contentsOf: chunk[0..<n])
        }
        return .success(data)
    }

    public static func text(_ path: String, limit: Int = defaultLimit) -> Result<String, Failure> {
        read(path, limit: limit).map { String(decoding: $0, as: UTF8.self) }
    }
}
