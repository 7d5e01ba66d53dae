import BallastCore
import BallastIO
import CLinux
import Logging

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A worker's splice pipes: a pipe is an index into its read and write ends; idle ones are kept
/// up to a cap, a closed one's index is reused by the next pipe made.
struct PipePool {
    private(set) var readEnd: [Int32] = []
    private(set) var writeEnd: [Int32] = []
    private var idle: [Int32] = []
    private var dead: [Int32] = []
    /// Bytes a pipe holds (the size asked for, or the kernel default when that was refused).
    private(set) var capacity: Int
    private var size: Int
    private var warned = false
    static let maxIdle = 256

    init(size: Int) {
        self.size = size
        capacity = size
        readEnd.reserveCapacity(1024)
        writeEnd.reserveCapacity(1024)
        idle.reserveCapacity(1024)
    }

    var total: Int { readEnd.count - dead.count }
    var idleCount: Int { idle.count }

    /// An idle pipe, or a new one; nil when no descriptor is left. `warn` is called once when
    /// the size cannot be set (above /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE).
    mutating func acquire(warn: (SysError) -> Void) -> Int32? {
        if let p = idle.popLast() { return p }
        guard let (r, w) = try? Pipe.create() else { return nil }
        do {
            capacity = try Pipe.setSize(w, size)
        } catch {
            if !warned {
                warned = true
                warn(error)
            }
            capacity = Int(ballast_get_pipe_size(w))
        }
        if let p = dead.popLast() {
            readEnd[Int(p)] = r
            writeEnd[Int(p)] = w
            return p
        }
        readEnd.append(r)
        writeEnd.append(w)
        return Int32(readEnd.count - 1)
    }

    /// Back to the pool when empty (and the pool is not full); closed otherwise.
    mutating func release(_ p: Int32, empty: Bool) {
        if empty && idle.count < PipePool.maxIdle {
            idle.append(p)
        } else {
            close(p)
        }
    }

    private mutating func close(_ p: Int32) {
        Sys.close(readEnd[Int(p)])
        Sys.close(writeEnd[Int(p)])
        readEnd[Int(p)] = -1
        writeEnd[Int(p)] = -1
        dead.append(p)
    }

    /// A new size for pipes made from now on; idle pipes of the old size are closed.
    mutating func resize(_ newSize: Int) {
        for p in idle { close(p) }
        idle.removeAll(keepingCapacity: true)
        size = newSize
        capacity = newSize
    }

    mutating func closeAll() {
        for p in readEnd.indices where readEnd[p] >= 0 { close(Int32(p)) }
        idle.removeAll()
    }
}

/// A worker's copy buffers, all of one size; a buffer is an index, freed ones are reused.
struct BufferPool {
    private(set) var memory: [UnsafeMutableRawPointer] = []
    private var free: [Int32] = []
    let size: Int

    init(size: Int) {
        self.size = size
        free.reserveCapacity(4096)
    }

    mutating func acquire() -> Int32 {
        if let b = free.popLast() { return b }
        memory.append(.allocate(byteCount: size, alignment: 16))
        return Int32(memory.count - 1)
    }

    mutating func release(_ b: Int32) { free.append(b) }

    func deallocateAll() {
        for b in memory { b.deallocate() }
    }
}

/// Pipes and copy buffers, borrowed by a direction while it moves bytes.
extension Worker {
    func acquirePipe(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Int32? {
        let have = withDir(c, up) { $0.pipe }
        if have >= 0 { return have }
        let p = pipes.acquire { error in
            logger.warning(
                "worker \(id): cannot set pipe size to \(settings.pipeSize) (\(error)); using the kernel default")
        }
        guard let p else {
            // No pipe (out of descriptors): this direction copies instead.
            withDir(c, up) { $0.splicing = false }
            return nil
        }
        withDir(c, up) { $0.pipe = p }
        pipesTotal.store(pipes.total, ordering: .relaxed)
        pipesIdle.store(pipes.idleCount, ordering: .relaxed)
        return p
    }

    /// Returns an empty pipe to the pool; a pipe that still holds bytes (aborted connection) is closed.
    func releasePipe(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) {
        let (p, inPipe) = withDir(c, up) { ($0.pipe, $0.inPipe) }
        guard p >= 0 else { return }
        withDir(c, up) {
            $0.pipe = -1
            $0.inPipe = 0
        }
        pipes.release(p, empty: inPipe == 0)
        pipesTotal.store(pipes.total, ordering: .relaxed)
        pipesIdle.store(pipes.idleCount, ordering: .relaxed)
    }

    func acquireBuffer(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Int32? {
        let have = withDir(c, up) { $0.buffer }
        if have >= 0 { return have }
        let b = buffers.acquire()
        withDir(c, up) { $0.buffer = b }
        return b
    }

    func releaseBuffer(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) {
        let b = withDir(c, up) { $0.buffer }
        guard b >= 0 else { return }
        withDir(c, up) {
            $0.buffer = -1
            $0.bufStart = 0
            $0.bufEnd = 0
        }
        buffers.release(b)
    }
}
