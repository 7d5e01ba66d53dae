// loadgen — the benchmark's client for workloads iperf3 and redis-benchmark do not cover.
//
//   loadgen connrate PORT SECONDS THREADS   short connections: connect, PING, +PONG, close; prints conn/s
//   loadgen hold PORT COUNT SECONDS         opens COUNT connections, checks each with PING/+PONG,
//                                           prints "ready N", holds them SECONDS, closes them
#if canImport(Glibc)
    import Glibc
#endif

let args = CommandLine.arguments
guard args.count >= 5 else {
    print("usage: loadgen connrate PORT SECONDS THREADS | loadgen hold PORT COUNT SECONDS")
    exit(2)
}
let port = UInt16(args[2])!
switch args[1] {
case "connrate":
    let seconds = Double(args[3])!
    let threads = Int(args[4])!
    let start = now()
    let deadline = start + seconds
    var tids: [pthread_t] = []
    var counters: [UnsafeMutablePointer<Counter>] = []
    for _ in 0..<threads {
        let c = UnsafeMutablePointer<Counter>.allocate(capacity: 1)
        c.initialize(to: Counter())
        counters.append(c)
        let job = UnsafeMutablePointer<Job>.allocate(capacity: 1)
        job.initialize(to: Job(port: port, deadline: deadline, counter: c))
        var tid = pthread_t()
        pthread_create(&tid, nil, connrateThread, job)
        tids.append(tid)
    }
    for t in tids { pthread_join(t, nil) }
    let elapsed = now() - start
    let ok = counters.reduce(0) { $0 + $1.pointee.ok }
    let failed = counters.reduce(0) { $0 + $1.pointee.failed }
    print("connrate \(Int(Double(ok) / elapsed)) ok \(ok) failed \(failed)")
case "hold":
    let count = Int(args[3])!
    let seconds = Double(args[4])!
    var fds: [Int32] = []
    fds.reserveCapacity(count)
    var failed = 0
    for _ in 0..<count {
        let fd = connect(port)
        if fd < 0 || !pingPong(fd) {
            failed += 1
            if fd >= 0 { close(fd) }
            continue
        }
        fds.append(fd)
    }
    print("ready \(fds.count) failed \(failed)")
    fflush(nil)
    let until = now() + seconds
    while now() < until { usleep(50_000) }
    for fd in fds { close(fd) }
default:
    print("unknown mode \(args[1])")
    exit(2)
}
