import BallastCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

enum ConnState: UInt8 {
    case free
    /// Waiting for the PROXY protocol header of an `accept_proxy` bind.
    case proxyHeader
    case queued
    case connecting
    case established
}

/// Why a connection ended, for the per-connection log line.
enum EndReason: UInt8, CustomStringConvertible {
    case done, clientReset, serverReset, connectFailed, connectTimeout, queueTimeout, queueFull, noServer
    case clientTimeout, serverTimeout, shutdown, serviceRemoved, serverDown, activeServerUp, badProxyHeader, refused

    var description: String {
        switch self {
        case .done: return "done"
        case .clientReset: return "client-reset"
        case .serverReset: return "server-reset"
        case .connectFailed: return "connect-failed"
        case .connectTimeout: return "connect-timeout"
        case .queueTimeout: return "queue-timeout"
        case .queueFull: return "queue-full"
        case .noServer: return "no-server"
        case .clientTimeout: return "client-timeout"
        case .serverTimeout: return "server-timeout"
        case .shutdown: return "shutdown"
        case .serviceRemoved: return "service-removed"
        case .serverDown: return "server-down"
        case .activeServerUp: return "active-server-up"
        case .badProxyHeader: return "bad-proxy-header"
        case .refused: return "refused"
        }
    }
}

/// One direction of a relay (client→server or server→client). Bytes in flight sit either in a
/// pooled copy buffer (small reads) or in a pooled pipe (bulk, spliced); idle, it holds neither.
struct Direction {
    var buffer: Int32 = -1
    var bufStart: Int32 = 0
    var bufEnd: Int32 = 0
    var pipe: Int32 = -1
    var inPipe: Int = 0
    /// Last read filled the copy buffer: the next reads splice.
    var splicing = false
    /// The source sent FIN.
    var eof = false
    /// FIN passed on to the destination.
    var shut = false
    var bytes: UInt64 = 0
    /// io_uring: the word of this direction's operation in the ring (0: none), cancelled at close.
    var ringOp: UInt64 = 0
    /// io_uring: this direction is bulk and moves by readiness (ring polls, then `splice`
    /// through a pipe, as the epoll engine does); otherwise by ring receives and sends.
    var polled = false

    var hasPending: Bool { bufEnd > bufStart || inPipe > 0 }
}

/// A connection slot. Lives in a `ConnTable` chunk; reused after close with a new generation.
struct Conn {
    var gen: UInt32 = 0
    var state: ConnState = .free
    var clientFd: Int32 = -1
    var serverFd: Int32 = -1
    var service: WorkerService?
    var server: Server?
    var serverIndex: Int32 = -1
    /// This worker's counter slots of the connection's service and server (no reference counting
    /// on the byte path; the objects outlive the connection).
    var serviceSlot: UnsafeMutablePointer<CounterSlot>?
    var serverSlot: UnsafeMutablePointer<CounterSlot>?
    var retriesLeft: Int32 = 0
    /// Servers whose connect failed for this connection (bit i: server i < 64): a retry goes
    /// to one not tried yet whenever one is usable.
    var tried: UInt64 = 0
    var clientAddr = sockaddr_storage()
    /// Counted in the service's per-client limits (released when the connection ends).
    var sourceCounted = false
    var acceptedAt: Int64 = 0
    var phaseDeadline: Int64 = 0
    var lastClientIO: Int64 = 0
    var lastServerIO: Int64 = 0

    var clientReadable = false
    var clientWritable = false
    var serverReadable = false
    var serverWritable = false
    /// The peer's FIN or hangup was reported by epoll: a short read is then not proof of an empty socket.
    var clientRdHup = false
    var serverRdHup = false
    var deferred = false
    /// io_uring: connect attempts made (a completion names the attempt it belongs to), and the
    /// words of the connect poll and of a queued client's hang-up poll while they are in the
    /// ring (0: none).
    var connectAttempt: UInt16 = 0
    var connectOp: UInt64 = 0
    var hangupOp: UInt64 = 0
    /// The client socket is on the epoll instance (always with epoll; with io_uring only while
    /// a PROXY header is read).
    var clientOnEpoll = false

    var up = Direction()  // client → server
    var down = Direction()  // server → client

    // Timer wheel links.
    var timerArmed = false
    var timerSlot: Int32 = 0
    var timerNext: Int32 = -1
    var timerPrev: Int32 = -1
    var timerDue: Int64 = 0

    // Queue links (service FIFO) and free-list link.
    var queueNext: Int32 = -1
    var queuePrev: Int32 = -1
    var nextFree: Int32 = -1
}

/// The connection table: fixed-size chunks allocated when the high-water mark first reaches them
/// (warm-up), never freed while the worker lives, so steady-state accept/close allocate nothing.
final class ConnTable {
    static let chunkShift = 10
    static let chunkSize = 1 << chunkShift
    private var chunks: [UnsafeMutablePointer<Conn>] = []
    let capacity: Int
    private(set) var highWater: Int32 = 0
    private var freeHead: Int32 = -1
    private(set) var live = 0

    init(capacity: Int) {
        self.capacity = capacity
        chunks.reserveCapacity((capacity + ConnTable.chunkSize - 1) / ConnTable.chunkSize)
    }

    deinit {
        for c in chunks {
            c.deinitialize(count: ConnTable.chunkSize)
            c.deallocate()
        }
    }

    @inline(__always)
    subscript(i: Int32) -> UnsafeMutablePointer<Conn> {
        chunks[Int(i) >> ConnTable.chunkShift] + (Int(i) & (ConnTable.chunkSize - 1))
    }

    /// A free slot, or nil when the table is full.
    func allocate() -> Int32? {
        if freeHead >= 0 {
            let i = freeHead
            freeHead = self[i].pointee.nextFree
            live += 1
            return i
        }
        guard Int(highWater) < capacity else { return nil }
        if Int(highWater) >> ConnTable.chunkShift >= chunks.count {
            let chunk = UnsafeMutablePointer<Conn>.allocate(capacity: ConnTable.chunkSize)
            chunk.initialize(repeating: Conn(), count: ConnTable.chunkSize)
            chunks.append(chunk)
        }
        let i = highWater
        highWater += 1
        live += 1
        return i
    }

    func free(_ i: Int32) {
        let c = self[i]
        let gen = c.pointee.gen &+ 1
        c.pointee = Conn()
        c.pointee.gen = gen
        c.pointee.nextFree = freeHead
        freeHead = i
        live -= 1
    }
}
