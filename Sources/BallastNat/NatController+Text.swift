import BallastCore
import BallastIO
import CLinux
import CNftables
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The same plan in nft syntax (`ballast nft show`, `show nft`), for reading and for `nft -c`.
extension NatController {
    // MARK: - nft syntax

    /// The ruleset Ballast owns, in `nft` syntax, as it is programmed now.
    public func render() -> String {
        let us = lastApplyMicros.load(ordering: .relaxed)
        let full = lastFullApplyMicros.load(ordering: .relaxed)
        return lock.withLock { _ in
            "# last full programming: \(full) us; last state change applied in \(us) us\n"
                + NatController.render(Array(services.values))
        }
    }

    static func render(_ list: [ServiceState]) -> String {
        var out = ""
        for fam in [UInt16(NFPROTO_IPV4), UInt16(NFPROTO_IPV6)] {
            let sv = list.filter { $0.family == fam }.sorted { $0.id < $1.id }
            if sv.isEmpty { continue }
            let v6 = fam == UInt16(NFPROTO_IPV6)
            let ip = v6 ? "ip6" : "ip"
            let addrType = v6 ? "ipv6_addr" : "ipv4_addr"
            func map(_ name: String, _ type: String, _ elements: [String], extra: String = "", typeof: String? = nil)
                -> String
            {
                var m = "\tmap \(name) {\n\t\t\(typeof.map { "typeof \($0)" } ?? "type \(type)")\n\(extra)"
                if !elements.isEmpty { m += "\t\telements = { \(elements.joined(separator: ", ")) }\n" }
                return m + "\t}\n"
            }
            out += "table \(ip) \(tableName) {\n"
            out += map(
                "services", "\(addrType) . inet_service : verdict",
                sv.flatMap { st in
                    st.config.binds.map { "\($0.address.hostText) . \($0.address.port) : goto \(st.chain)" }
                })
            out += map(
                "source-nat", "mark : verdict",
                sv.filter { $0.config.snat != .none }.map { "0x\(hex8($0.id << 16)) : jump \($0.snatChain)" })
            out += map(
                "traffic", "mark : verdict",
                sv.flatMap { st in
                    st.config.servers.indices.map { "0x\(hex8(st.marks[$0])) : jump \(st.serverChain($0))" }
                })
            let ends = NatController.replyEnds(sv).sorted { $0.description < $1.description }
            out += "\tset replies {\n\t\ttype \(addrType) . inet_service\n"
            if !ends.isEmpty {
                out += "\t\telements = { \(ends.map { "\($0.hostText) . \($0.port)" }.joined(separator: ", ")) }\n"
            }
            out += "\t}\n"
            for st in sv {
                out += map(
                    st.backends, "mark : \(addrType) . inet_service",
                    st.addrs.enumerated().compactMap { j, a in
                        a.map { "0x\(hex8(st.marks[j])) : \($0.hostText) . \($0.port)" }
                    })
                // `typeof` (not `type mark : mark`): nft reads a map keyed by a hash or a
                // counter back only when told which expression fills the key.
                let total = st.weights.reduce(0, +)
                if st.config.balance == .source {
                    let used = st.slots.filter { $0 >= 0 }.count
                    let key = st.config.hashKey == .sourcePort ? "\(ip) saddr . tcp sport" : "\(ip) saddr"
                    out += map(
                        st.sched, "", [],
                        extra: "\t\tsize \(st.config.hashTableSize)\n\t\t# \(used) Maglev slots\n",
                        typeof: "jhash \(key) mod \(st.config.hashTableSize) seed 0x\(hex8(SourceHash.seed)) : ct mark")
                } else {
                    var lo = 0
                    var ranges: [String] = []
                    for (j, w) in st.weights.enumerated() where w > 0 {
                        ranges.append(
                            w == 1 ? "\(lo) : 0x\(hex8(st.marks[j]))" : "\(lo)-\(lo + w - 1) : 0x\(hex8(st.marks[j]))")
                        lo += w
                    }
                    let gen = st.config.balance == .random ? "random" : "inc"
                    out += map(
                        st.sched, "", ranges, extra: "\t\tflags interval\n",
                        typeof: "numgen \(gen) mod \(max(1, total)) : ct mark")
                }
                for (set, list) in [(st.denySet, st.access.deny), (st.allowSet, st.access.allow)] where !list.isEmpty {
                    let ranges = NatController.textRanges(list.filter { $0.isV6 == v6 })
                    out += "\tset \(set) {\n\t\ttype \(addrType)\n\t\tflags interval\n"
                    if !ranges.isEmpty { out += "\t\telements = { \(ranges.joined(separator: ", ")) }\n" }
                    out += "\t}\n"
                }
                if st.config.limits.connections != nil {
                    out += "\tset \(st.connSet) {\n\t\ttype \(addrType)\n\t\tsize 65535\n\t\tflags dynamic\n\t}\n"
                }
                if st.config.limits.rate != nil {
                    out +=
                        "\tset \(st.rateSet) {\n\t\ttype \(addrType)\n\t\tsize 65535\n\t\tflags dynamic,timeout\n\t\ttimeout \(2 * st.config.limits.ratePeriodMs / 1000)s\n\t}\n"
                }
            }
            for hook in ["prerouting", "output"] {
                out +=
                    "\tchain \(hook) {\n\t\ttype nat hook \(hook) priority \(hook == "output" ? "-100" : "dstnat"); policy accept;\n"
                out += "\t\tmeta l4proto tcp \(ip) daddr . tcp dport vmap @services\n\t}\n"
            }
            out += "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            out += "\t\tct mark 0x00000000/16 accept\n\t\tct mark & 0xffff0000 vmap @source-nat\n\t}\n"
            out += "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n"
            out += "\t\tct state new meta l4proto tcp \(ip) saddr . tcp sport @replies counter drop\n"
            out += "\t\tct mark vmap @traffic\n\t}\n"
            for st in sv {
                out += "\tchain \(st.chain) {\n"
                if !st.access.deny.isEmpty { out += "\t\t\(ip) saddr @\(st.denySet) counter drop\n" }
                if !st.access.allow.isEmpty { out += "\t\t\(ip) saddr != @\(st.allowSet) counter drop\n" }
                if let n = st.config.limits.connections {
                    out += "\t\tadd @\(st.connSet) { \(ip) saddr ct count over \(n) } counter drop\n"
                }
                if let n = st.config.limits.rate {
                    let unit =
                        ["1": "second", "60": "minute", "3600": "hour"]["\(st.config.limits.ratePeriodMs / 1000)"]
                        ?? "second"
                    out +=
                        "\t\tadd @\(st.rateSet) { \(ip) saddr limit rate over \(n)/\(unit) burst \(NatController.rateBurst) packets } counter drop\n"
                }
                let total = st.weights.reduce(0, +)
                if st.config.balance == .source {
                    let key = st.config.hashKey == .sourcePort ? "\(ip) saddr . tcp sport" : "\(ip) saddr"
                    out +=
                        "\t\tct mark set jhash \(key) mod \(st.config.hashTableSize) seed 0x\(hex8(SourceHash.seed)) map @\(st.sched)\n"
                    out += "\t\tmeta l4proto tcp dnat \(ip) to ct mark map @\(st.backends)\n"
                } else if total > 0 {
                    out +=
                        "\t\tct mark set numgen \(st.config.balance == .random ? "random" : "inc") mod \(total) map @\(st.sched)\n"
                    out += "\t\tmeta l4proto tcp dnat \(ip) to ct mark map @\(st.backends)\n"
                }
                out += "\t}\n"
                // In the order the netlink batch creates them (nft lists objects so).
                for j in st.config.servers.indices {
                    out +=
                        "\tchain \(st.serverChain(j)) {\n\t\tct state new counter\n\t\tct direction original counter\n\t\tct direction reply counter\n\t}\n"
                }
                switch st.config.snat {
                case .none: break
                case .masquerade: out += "\tchain \(st.snatChain) {\n\t\tmasquerade\n\t}\n"
                case .address(let a): out += "\tchain \(st.snatChain) {\n\t\tsnat \(ip) to \(a.hostText)\n\t}\n"
                }
            }
            out += "}\n"
        }
        out += renderNetdev(list.filter { $0.family == netdev }.sorted { $0.id < $1.id })
        return out
    }

    /// dsr services: `table netdev ballast` (see NatController+DSR.swift for the shape).
    static func renderNetdev(_ sv: [ServiceState]) -> String {
        guard !sv.isEmpty else { return "" }
        func map(_ name: String, _ type: String, _ elements: [String], extra: String = "", typeof: String? = nil)
            -> String
        {
            var m = "\tmap \(name) {\n\t\t\(typeof.map { "typeof \($0)" } ?? "type \(type)")\n\(extra)"
            if !elements.isEmpty { m += "\t\telements = { \(elements.joined(separator: ", ")) }\n" }
            return m + "\t}\n"
        }
        var out = "table netdev \(tableName) {\n"
        for v6 in [false, true] {
            out += map(
                v6 ? "services6" : "services4", "\(v6 ? "ipv6_addr" : "ipv4_addr") . inet_service : verdict",
                sv.flatMap { st in
                    st.config.binds.filter { ($0.address.family == AF_INET6) == v6 }.map {
                        "\($0.address.hostText) . \($0.address.port) : goto \(st.chain)"
                    }
                })
        }
        out += map(
            "traffic", "mark : verdict",
            sv.flatMap { st in st.config.servers.indices.map { "0x\(hex8(st.marks[$0])) : goto \(st.serverChain($0))" }
            })
        for st in sv {
            let ip = st.config.binds.first?.address.family == AF_INET6 ? "ip6" : "ip"
            out += map(
                st.backends, "mark : ether_addr",
                st.macs.enumerated().compactMap { j, m in m.map { "0x\(hex8(st.marks[j])) : \(Interface.macText($0))" }
                })
            let used = st.slots.filter { $0 >= 0 }.count
            let key = st.config.hashKey == .sourcePort ? "\(ip) saddr . tcp sport" : "\(ip) saddr"
            out += map(
                st.sched, "", [], extra: "\t\tsize \(st.config.hashTableSize)\n\t\t# \(used) Maglev slots\n",
                typeof: "jhash \(key) mod \(st.config.hashTableSize) seed 0x\(hex8(SourceHash.seed)) : meta mark")
        }
        for dev in Set(sv.compactMap(\.config.interface)).sorted() {
            out +=
                "\tchain ingress-\(dev) {\n\t\ttype filter hook ingress device \"\(dev)\" priority filter; policy accept;\n"
            out += "\t\tmeta protocol ip meta l4proto tcp ip daddr . tcp dport vmap @services4\n"
            out += "\t\tmeta protocol ip6 meta l4proto tcp ip6 daddr . tcp dport vmap @services6\n\t}\n"
        }
        for st in sv {
            let ip = st.config.binds.first?.address.family == AF_INET6 ? "ip6" : "ip"
            let key = st.config.hashKey == .sourcePort ? "\(ip) saddr . tcp sport" : "\(ip) saddr"
            out += "\tchain \(st.chain) {\n"
            out +=
                "\t\tmeta mark set jhash \(key) mod \(st.config.hashTableSize) seed 0x\(hex8(SourceHash.seed)) map @\(st.sched)\n"
            out +=
                "\t\tether daddr set meta mark map @\(st.backends) ether saddr set \(Interface.macText(st.devMac.isEmpty ? [0, 0, 0, 0, 0, 0] : st.devMac)) meta mark vmap @traffic\n"
            out += "\t}\n"
            for j in st.config.servers.indices {
                out +=
                    "\tchain \(st.serverChain(j)) {\n\t\ttcp flags & (syn | ack) == syn counter\n\t\tcounter\n\t\tfwd to \"\(st.config.interface ?? "")\"\n\t}\n"
            }
        }
        return out + "}\n"
    }

    /// The merged ranges of an interval set as nft writes addresses: `10.0.0.0-10.255.255.255`.
    static func textRanges(_ prefixes: [IPPrefix]) -> [String] {
        let elements = intervalElements(prefixes)
        var out: [String] = []
        var start: [UInt8]?
        func text(_ b: [UInt8]) -> String {
            var buf = [CChar](repeating: 0, count: 64)
            var bytes = b
            _ = bytes.withUnsafeMutableBytes { inet_ntop(b.count == 16 ? AF_INET6 : AF_INET, $0.baseAddress, &buf, 64) }
            return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        func last(before b: [UInt8]) -> [UInt8] {
            var x = b
            for i in x.indices.reversed() {
                if x[i] == 0 {
                    x[i] = 0xFF
                } else {
                    x[i] -= 1
                    break
                }
            }
            return x
        }
        for e in elements {
            if e.intervalEnd {
                if let s = start {
                    let end = last(before: e.key)
                    out.append(s == end ? text(s) : "\(text(s))-\(text(end))")
                    start = nil
                }
            } else {
                start = e.key
            }
        }
        if let s = start {
            out.append("\(text(s))-\(text([UInt8](repeating: 0xFF, count: s.count)))")
        }
        return out
    }

    static func hex8(_ v: UInt32) -> String {
        let h = String(v, radix: 16)
        return String(repeating: "0", count: max(0, 8 - h.count)) + h
    }

    /// The ruleset a config would program with every server up (for `ballast nft show -c`).
    public static func render(config: Config) -> String {
        let table = ServiceTable.build(config: config, generation: 0, previous: nil, now: 0, states: ServerStates())
        var list: [ServiceState] = []
        for (k, svc) in table.services.enumerated() where svc.config.mode.isKernel {
            let id = UInt32(k + 1)
            var st = ServiceState(
                name: svc.name, id: id, family: family(svc.config), config: svc.config,
                marks: svc.servers.indices.map { (id << 16) | UInt32($0 + 1) })
            st.access = svc.stats.access.list
            st.addrs = svc.servers.map { $0.hasAddress.load(ordering: .relaxed) ? $0.address : nil }
            if let dev = svc.config.interface { st.devMac = Interface.mac(dev) ?? [] }
            let w = svc.servers.indices.map { i in svc.backupFlags[i] ? 0 : svc.servers[i].weight }
            st.weights = w
            if st.config.balance == .source {
                st.slots =
                    MaglevTable(names: svc.servers.map(\.name), weights: w, size: st.config.hashTableSize).entries
            }
            list.append(st)
        }
        return render(list)
    }
}
