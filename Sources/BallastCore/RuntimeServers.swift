/// Server changes an operator made at run time (`add server`, `del server`, `set server …
/// addr`), kept per service together with the digest of the service's text they were made
/// against. They are laid over every config loaded after them (a reload, a restart through the
/// state file) for as long as that service's text stays the same; once the file changes the
/// service, the file is the truth again and the changes are dropped (and said so).
public struct RuntimeServers: Sendable, Equatable {
    public struct Changes: Sendable, Equatable {
        /// `ServiceConfig.digest` of the service they were made against.
        public var digest: UInt64
        /// Servers added, in the order they were added (appended after the file's).
        public var added: [AddedServer] = []
        /// Names of the file's servers deleted (an added server that is deleted just goes).
        public var deleted: [String] = []
        /// Servers moved to another numeric address (by name; file or added servers).
        public var addresses: [String: SocketAddress] = [:]

        public init(digest: UInt64) { self.digest = digest }

        public var isEmpty: Bool { added.isEmpty && deleted.isEmpty && addresses.isEmpty }
    }

    public private(set) var services: [String: Changes] = [:]

    public init() {}

    public var isEmpty: Bool { services.isEmpty }

    /// The changes of `service`, started against `base` when there are none yet.
    mutating func edit(_ base: ServiceConfig, _ body: (inout Changes) -> Void) {
        var c = services[base.name] ?? Changes(digest: base.digest)
        body(&c)
        services[base.name] = c.isEmpty ? nil : c
    }

    /// `add server`: `server` joins the service (after its other servers).
    public mutating func add(_ server: AddedServer, to base: ServiceConfig) {
        edit(base) { $0.added.append(server) }
    }

    /// `del server`: the server leaves the service.
    public mutating func delete(_ name: String, from base: ServiceConfig) {
        edit(base) { c in
            c.addresses[name] = nil
            if let k = c.added.firstIndex(where: { $0.name == name }) {
                c.added.remove(at: k)
            } else if !c.deleted.contains(name) {
                c.deleted.append(name)
            }
        }
    }

    /// `set server … addr`: the server's numeric address from now on.
    public mutating func move(_ name: String, to address: SocketAddress, in base: ServiceConfig) {
        edit(base) { c in
            if let k = c.added.firstIndex(where: { $0.name == name }) {
                c.added[k].address = address
            } else if base.servers.first(where: { $0.name == name })?.address == address {
                c.addresses[name] = nil  // back where the file has it
            } else {
                c.addresses[name] = address
            }
        }
    }

    /// Restores saved changes (the state file) without a base at hand.
    public mutating func restore(_ service: String, _ changes: Changes) {
        services[service] = changes.isEmpty ? nil : changes
    }

    /// `config` with the changes laid over it. Changes whose service is gone or whose text
    /// changed are dropped; their service names are returned.
    public mutating func apply(to config: Config) -> (Config, dropped: [String]) {
        var out = config
        var dropped: [String] = []
        for name in services.keys.sorted() {
            let c = services[name]!
            guard let k = out.services.firstIndex(where: { $0.name == name }), out.services[k].digest == c.digest else {
                dropped.append(name)
                services[name] = nil
                continue
            }
            var svc = out.services[k]
            svc.servers.removeAll { c.deleted.contains($0.name) }
            for j in svc.servers.indices {
                if let a = c.addresses[svc.servers[j].name] {
                    svc.servers[j].address = a
                    svc.servers[j].hostname = nil
                    svc.servers[j].resolved = true
                }
            }
            // An added server whose name the file now uses too: the file's wins.
            svc.servers += c.added.filter { a in !svc.servers.contains { $0.name == a.name } }.map {
                svc.makeServer($0)
            }
            out.services[k] = svc
        }
        return (out, dropped)
    }
}
