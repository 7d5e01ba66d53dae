public enum BallastVersion {
    public static let string = "0.1.0"

    /// Build details for `ballast --version`.
    public static var build: String {
        #if DEBUG
            let configuration = "debug"
        #else
            let configuration = "release"
        #endif
        #if compiler(>=6.3)
            let compiler = "Swift 6.3+"
        #elseif compiler(>=6.0)
            let compiler = "Swift 6"
        #else
            let compiler = "Swift 5"
        #endif
        #if arch(x86_64)
            let arch = "x86_64"
        #elseif arch(arm64)
            let arch = "aarch64"
        #else
            let arch = "unknown"
        #endif
        return "\(configuration) build, \(compiler), linux-\(arch)"
    }
}

extension Config {
    /// What `ballast check` prints: services, binds, servers, as they would run.
    public var summary: String {
        var out = ""
        let workers = global.workers.map(String.init) ?? "auto"
        out +=
            "global: workers \(workers), maxconn \(global.maxconn), pipe_size \(global.pipeSize), grace \(global.grace)\n"
        for s in services {
            let t = s.timeouts
            out += "service \(s.name): mode \(s.mode.rawValue), balance \(s.balance.rawValue), retries \(s.retries), "
            out +=
                "timeout connect \(t.connect) client \(t.client) server \(t.server) queue \(t.queue), maxqueue \(s.maxqueue)\n"
            for b in s.binds { out += "  bind \(b.address)\n" }
            for v in s.servers {
                var flags = "weight \(v.weight)"
                if v.maxconn > 0 { flags += ", maxconn \(v.maxconn)" }
                if v.backup { flags += ", backup" }
                out += "  server \(v.name) \(v.address) (\(flags))\n"
            }
        }
        return out
    }
}
