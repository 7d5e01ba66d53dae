import Foundation
import Testing

@testable import BallastCore

struct ConfigTests {
    static let good = """
        global:
          workers: 2
          maxconn: 1000
          log: { level: debug, format: json, connections: true }
          pipe_size: 256k
          grace: 3s
        defaults:
          timeout: { connect: 500ms, client: 2m, server: 1h, queue: 5s }
          retries: 3
        services:
          - name: redis
            bind: ["127.0.0.1:6379", "[::1]:6379"]
            balance: roundrobin
            timeout: { connect: 1s }
            maxqueue: 10
            servers:
              - { name: r1, address: 10.0.0.11:6379, weight: 3 }
              - { name: r2, address: "[2001:db8::2]:6379", maxconn: 100 }
              - { name: r3, address: 10.0.0.13:6379, backup: true }
        """

    @Test func parsesEveryKey() throws {
        let c = try ConfigLoader.load(path: "good.yaml", contents: Self.good)
        #expect(c.global.workers == 2)
        #expect(c.global.maxconn == 1000)
        #expect(c.global.log.level == .debug && c.global.log.format == .json && c.global.log.connections)
        #expect(c.global.pipeSize == 256 << 10)
        #expect(c.global.grace == Millis(3000))
        let s = try #require(c.services.first)
        #expect(s.binds.map(\.address.description) == ["127.0.0.1:6379", "[::1]:6379"])
        #expect(s.timeouts.connect == Millis(1000))  // service overrides defaults
        #expect(s.timeouts.client == Millis(120_000))  // inherited from defaults
        #expect(s.timeouts.server == Millis(3_600_000))
        #expect(s.retries == 3)
        #expect(s.maxqueue == 10)
        #expect(s.servers.map(\.name) == ["r1", "r2", "r3"])
        #expect(s.servers[0].weight == 3 && s.servers[1].weight == 1)
        #expect(s.servers[1].address.description == "[2001:db8::2]:6379")
        #expect(s.servers[1].maxconn == 100)
        #expect(s.servers[2].backup)
        #expect(s.servers[2].location == SourceLocation(file: "good.yaml", line: 19, column: 9))
    }

    @Test func defaultsApplyWhenOmitted() throws {
        let c = try ConfigLoader.load(
            path: "min.yaml",
            contents:
                "services:\n  - name: a\n    bind: 127.0.0.1:1\n    servers: [{ name: s, address: 127.0.0.1:2 }]\n")
        #expect(c.global.workers == nil)
        #expect(c.global.maxconn == Defaults.maxconn)
        #expect(c.global.pipeSize == Defaults.pipeSize)
        #expect(c.services[0].timeouts == Timeouts())
        #expect(c.services[0].retries == Defaults.retries)
        #expect(c.services[0].balance == .roundrobin)
        #expect(c.services[0].servers[0].weight == Defaults.weight)
    }

    /// Each bad config and the exact line a user sees.
    static let badConfigs: [(String, String)] = [
        ("", "bad.yaml:1:1: the file is empty: at least one service is required"),
        // dsr mode: what direct routing cannot do, said where the config says it.
        (
            "services:\n  - name: d\n    mode: dsr\n    bind: 10.0.0.1:80\n    servers: [{ name: a, address: 10.0.0.2:80 }]\n",
            "bad.yaml:2:5: service 'd': mode dsr needs 'interface' (the interface on the servers' L2 segment, where the frames are sent out again)"
        ),
        (
            "services:\n  - name: d\n    mode: dsr\n    interface: eth1\n    bind: 10.0.0.1:80\n    servers: [{ name: a, address: 10.0.0.2:8080 }]\n",
            "bad.yaml:6:15: service 'd': server a listens on port 8080 but the service on 80: dsr cannot translate ports (the server gets the packet as the client sent it, to the service address and port); give the server port 80, or use mode: nat"
        ),
        (
            "services:\n  - name: d\n    mode: dsr\n    interface: eth1\n    bind: 10.0.0.1:80\n    nat: { snat: masquerade }\n    servers: [{ name: a, address: 10.0.0.2:80 }]\n",
            "bad.yaml:6:5: service 'd': nat.snat is not possible in dsr mode (the servers answer the clients directly, from the service address)"
        ),
        (
            "services:\n  - name: d\n    mode: dsr\n    interface: eth1\n    bind: 10.0.0.1:80\n    servers: [{ name: a, address: \"db.example:80\", init_addr: none }]\n",
            "bad.yaml:6:15: service 'd': server a: dsr mode needs a numeric address (the server is reached by its L2 neighbour entry for that address)"
        ),
        (
            "services:\n  - name: d\n    mode: dsr\n    interface: eth1\n    bind: 10.0.0.1:80\n    balance: roundrobin\n    servers: [{ name: a, address: 10.0.0.2:80 }]\n",
            "bad.yaml:6:14: service 'd': balance roundrobin is not possible in dsr mode: without connection state every packet is placed on its own, so only a hash of the flow keeps a connection on one server; use balance: source (Maglev, the same table as nat and proxy mode)"
        ),
        (
            "services:\n  - name: d\n    mode: dsr\n    interface: eth1\n    bind: 10.0.0.1:80\n    deny: [192.0.2.0/24]\n    servers: [{ name: a, address: 10.0.0.2:80 }]\n",
            "bad.yaml:6:5: service 'd': deny is not possible in dsr mode (the frames are switched before any connection is known); filter on the router in front, or use mode: nat"
        ),
        (
            "services:\n  - name: d\n    interface: eth1\n    bind: 10.0.0.1:80\n    servers: [{ name: a, address: 10.0.0.2:80 }]\n",
            "bad.yaml:3:5: service 'd': 'interface' applies to mode: dsr services"
        ),
        ("services: [", "bad.yaml:1:11: invalid YAML: a '[' that starts here is not closed"),
        (
            "global: { workrs: 2 }\nservices: []\n",
            "bad.yaml:1:11: unknown key 'workrs' in global (did you mean 'workers'?); expected one of: workers, maxconn, log, pipe_size, engine, grace, user, group, stats, metrics, state_file, nat"
        ),
        (
            "global: { engine: uring }\nservices: []\n",
            "bad.yaml:1:19: global.engine must be epoll, io_uring or io_uring_sqpoll, not 'uring'"
        ),
        (
            "global:\n  stats:\n    sockets:\n      - { address: 10.1.2.3:9999 }\nservices:\n"
                + svc("a", "127.0.0.1:1"),
            "bad.yaml:4:20: global.stats.sockets[0].address: 10.1.2.3:9999 is not a loopback address; the runtime API and metrics have no authentication, so they listen on 127.0.0.0/8 or ::1 only"
        ),
        (
            "global:\n  stats:\n    sockets:\n      - { path: /run/b.sock, mode: 8a0 }\nservices:\n"
                + svc("a", "127.0.0.1:1"),
            "bad.yaml:4:36: global.stats.sockets[0].mode: '8a0' is not an octal file mode such as 600 or 660"
        ),
        (
            "global:\n  stats:\n    sockets:\n      - { path: /run/b.sock, address: 127.0.0.1:1 }\nservices:\n"
                + svc("a", "127.0.0.1:1"),
            "bad.yaml:4:30: global.stats.sockets[0]: give path or address, not both"
        ),
        (
            "global:\n  stats:\n    sockets:\n      - { path: /run/b.sock, level: root }\nservices:\n"
                + svc("a", "127.0.0.1:1"),
            "bad.yaml:4:37: global.stats.sockets[0].level: unknown value 'root'; expected one of: user, operator, admin"
        ),
        (
            "global:\n  stats:\n    sockets:\n      - { path: run/b.sock }\nservices:\n" + svc("a", "127.0.0.1:1"),
            "bad.yaml:4:17: global.stats.sockets[0].path must be an absolute path"
        ),
        (
            "global:\n  stats: { timeout: 5s }\nservices:\n" + svc("a", "127.0.0.1:1"),
            "bad.yaml:2:10: global.stats: missing required key 'sockets'"
        ),
        (
            "global:\n  metrics: { address: 0.0.0.0:9100 }\nservices:\n" + svc("a", "127.0.0.1:1"),
            "bad.yaml:2:23: global.metrics.address: 0.0.0.0:9100 is not a loopback address; the runtime API and metrics have no authentication, so they listen on 127.0.0.0/8 or ::1 only"
        ),
        (
            "services:\n  - name: n\n    mode: nat\n    bind: 10.0.0.1:80\n    balance: first\n    servers: [{ name: a, address: 10.0.0.2:80 }]\n",
            "bad.yaml:5:14: service 'n': balance first is not possible in nat mode (the kernel does not count connections per server); use roundrobin or random (weighted), source (Maglev, the same table as proxy mode), or mode: proxy"
        ),
        (
            "services:\n  - name: n\n    mode: nat\n    bind: 10.0.0.1:80\n    servers: [{ name: a, address: 10.0.0.2:80, maxconn: 5 }]\n",
            "bad.yaml:5:15: service 'n': server a: maxconn is not possible in nat mode (the kernel does not count connections per server)"
        ),
        (
            "services:\n  - name: n\n    mode: nat\n    bind: 0.0.0.0:80\n    servers: [{ name: a, address: 10.0.0.2:80 }]\n",
            "bad.yaml:4:11: service 'n': a nat bind needs an explicit address and port (the service address the kernel matches), not 0.0.0.0:80"
        ),
        (
            "services:\n  - name: n\n    mode: nat\n    bind: 10.0.0.1:80\n    servers: [{ name: a, address: \"[::1]:80\" }]\n",
            "bad.yaml:5:15: service 'n': server a [::1]:80 is not the same family as the service address"
        ),
        (
            "global:\n  state_file: state.txt\nservices:\n" + svc("a", "127.0.0.1:1"),
            "bad.yaml:2:15: global.state_file must be an absolute path"
        ),
        ("global: { workers: 2 }\n", "bad.yaml:1:1: missing required key 'services'"),
        ("services: []\n", "bad.yaml:1:11: 'services' must be a non-empty list of services"),
        (
            "defaults: { timeout: { connect: 2 parsecs } }\nservices: []\n",
            "bad.yaml:1:33: defaults.timeout.connect: '2 parsecs' is not a duration (use a number with ms, s, m, h or d, such as 500ms or 2s)"
        ),
        (
            "defaults: { timeout: { client: 0s } }\nservices: []\n",
            "bad.yaml:1:32: defaults.timeout.client must be greater than zero"
        ),
        (
            "defaults: { retries: -1 }\nservices: []\n",
            "bad.yaml:1:22: defaults.retries must be between 0 and 100, not -1"
        ),
        ("global: { maxconn: lots }\nservices: []\n", "bad.yaml:1:20: global.maxconn must be an integer, not 'lots'"),
        (
            "global: { log: { format: xml } }\nservices: []\n",
            "bad.yaml:1:26: global.log.format: unknown value 'xml'; expected one of: text, json"
        ),
        (
            svc("a", "127.0.0.1:70000"),
            "bad.yaml:3:12: service 'a': bind '127.0.0.1:70000': port '70000' is not a number between 0 and 65535"
        ),
        (
            svc("a", "localhost:80"),
            "bad.yaml:3:12: service 'a': bind 'localhost:80': 'localhost' is not a numeric IPv4 or IPv6 address"
        ),
        (
            svc("a", "::1:80"),
            "bad.yaml:3:12: service 'a': bind '::1:80': '::1' is not a numeric IPv4 or IPv6 address (write IPv6 addresses as [ADDRESS]:PORT)"
        ),
        (
            svc("a", "127.0.0.1"),
            "bad.yaml:3:12: service 'a': bind '127.0.0.1': expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)"
        ),
        (
            svc("a", "127.0.0.1:1") + svc("a", "127.0.0.1:2"),
            "bad.yaml:5:5: duplicate service name 'a' (first defined at bad.yaml:2:5)"
        ),
        (
            svc("a", "127.0.0.1:1") + svc("b", "127.0.0.1:1"),
            "bad.yaml:6:12: bind 127.0.0.1:1 is already used by service 'a' at bad.yaml:3:12"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: []\n",
            "bad.yaml:4:14: service 'a': 'servers' must be a non-empty list of servers"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n",
            "bad.yaml:2:5: service 'a': missing required key 'servers'"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers:\n      - { name: s, address: 10.0.0.1:1 }\n      - { name: s, address: 10.0.0.2:1 }\n",
            "bad.yaml:6:9: service 'a': duplicate server name 's' (first defined at bad.yaml:5:9)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers:\n      - { name: s, address: 10.0.0.1:1, weight: 300 }\n",
            "bad.yaml:5:49: service 'a' server 's': weight must be between 0 and 256, not 300"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers:\n      - { name: s, address: 10.0.0.1:0 }\n",
            "bad.yaml:5:29: service 'a' server 's': address '10.0.0.1:0': port 0 cannot be connected to"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers:\n      - { name: s, adress: 10.0.0.1:1 }\n",
            "bad.yaml:5:20: unknown key 'adress' in service 'a' servers[0] (did you mean 'address'?); expected one of: name, address, weight, maxconn, backup, slowstart, state, check, send_proxy, allow_self, init_addr, resolve_interval"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    balance: fastest\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:14: service 'a': balance: unknown value 'fastest'; expected one of: roundrobin, leastconn, source, random, first"
        ),
        (
            "services:\n  - name: a\n    name: b\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:2:5: duplicate key 'name' in the mapping that starts here"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    hash_key: source-port\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:5: service 'a': hash_key applies only to balance: source (balance is roundrobin)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    balance: source\n    hash_key: destination\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:5:15: service 'a': hash_key: unknown value 'destination'; expected one of: source, source-port"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    balance: source\n    hash_table_size: 65536\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:5:22: service 'a': hash_table_size 65536 is not prime (Maglev needs a prime table size; the next prime is 65537)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    balance: source\n    hash_table_size: 13\n    servers: [{ name: s, address: 10.0.0.1:1 }, { name: t, address: 10.0.0.2:1 }]\n",
            "bad.yaml:5:22: service 'a': hash_table_size 13 is too small for 2 servers (Maglev needs at least 10 slots per server; try 211)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: 10.0.0.1:1, weight: -1 }]\n",
            "bad.yaml:4:55: service 'a' server 's': weight must be between 0 and 256, not -1"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: 10.0.0.1:1, state: broken }]\n",
            "bad.yaml:4:54: service 'a' server 's': state: unknown value 'broken'; expected one of: ready, drain, maint"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: smtp }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:20: service 'a' check.type: unknown value 'smtp'; expected one of: tcp, http, redis, mysql, agent"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: mysql, password: pw }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:12: service 'a' check: a mysql password needs a user"
        ),
        (
            "defaults:\n  check: { rise: 0 }\nservices: []\n",
            "bad.yaml:2:18: defaults.check.rise must be between 1 and 100, not 0"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { interval: 1s, timeout: 2s }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:37: service 'a' check: timeout 2s is above interval 1s; a check must end before the next one starts"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: redis, password: x, password_file: /etc/pw }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:40: service 'a' check: give password or password_file, not both"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: http, expect: [200, 600] }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:40: service 'a' check.expect: '600' is not a status code or range between 100 and 599 (such as 200 or 200-299)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    on_marked_down: reboot\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:21: service 'a': on_marked_down: unknown value 'reboot'; expected one of: none, shutdown-sessions"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: 10.0.0.1:1, send_proxy: v3 }]\n",
            "bad.yaml:4:59: service 'a' server 's': send_proxy: unknown value 'v3'; expected one of: v1, v2"
        ),
        (
            "services:\n  - name: a\n    bind: [{ address: \"127.0.0.1:1\", accept_proxy: maybe }]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:3:52: service 'a' bind accept_proxy must be true or false, not 'maybe'"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    observe: { fails: 3 }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:5: service 'a': observe needs an active check (check:) to bring a server back up"
        ),
        (
            "global: { group: nogroup }\nservices: []\n",
            "bad.yaml:1:11: global.group needs global.user"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { send_proxy: v9 }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:26: service 'a' check.send_proxy: unknown value 'v9'; expected one of: v1, v2"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: redis }\n    sentinel: { addresses: [\"127.0.0.1:26379\"], master: m }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:5:5: service 'a': sentinel needs the service's check to be 'type: redis, role: master' (Sentinel names the master; the check confirms it)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: redis, role: master }\n    sentinel: { addresses: [\"127.0.0.1:26379\"] }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:5:15: service 'a' sentinel: missing required key 'master' (the name in 'sentinel monitor NAME …')"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: tcp, max_lag: 5s }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:25: service 'a' check: max_lag applies to replica checks only (type: redis with role: replica, or type: mysql with require: replica), not to a tcp check"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: mysql, user: u, require: replica, max_lag: -5s }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:63: service 'a' check.max_lag: '-5s' is not a duration (use a number with ms, s, m, h or d, such as 500ms or 2s)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: mysql, user: u, expect: \"1\" }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:36: service 'a' check: expect needs a query whose first value it checks"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    check: { type: redis, role: master, init_state: sideways }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:53: service 'a' check.init_state: unknown value 'sideways'; expected one of: fully-up, up, down, fully-down"
        ),
        (
            "services:\n  - name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: \"10.0.0.1:1\" }]\n",
            "bad.yaml:2:11: service name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa…' is 65 characters long; at most 64"
        ),
        (
            "services:\n  - name: FRONTEND\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: \"10.0.0.1:1\" }]\n",
            "bad.yaml:2:11: service name 'FRONTEND' is reserved: show stat names a service's own rows FRONTEND and BACKEND"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: BACKEND, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:23: server name 'BACKEND' is reserved: show stat names a service's own rows FRONTEND and BACKEND"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    timeout: { client: 106751991167d }\n    servers: [{ name: s, address: \"10.0.0.1:1\" }]\n",
            "bad.yaml:4:24: service 'a' timeout.client: '106751991167d' is too long; at most 24d (2147483647 ms)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    timeout: { client: 25d }\n    servers: [{ name: s, address: \"10.0.0.1:1\" }]\n",
            "bad.yaml:4:24: service 'a' timeout.client: '25d' is too long; at most 24d (2147483647 ms)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: \"0.0.0.0:80\" }]\n",
            "bad.yaml:4:35: service 'a' server 's': address '0.0.0.0:80' is the unspecified address; a server needs a unicast address"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: \"255.255.255.255:80\" }]\n",
            "bad.yaml:4:35: service 'a' server 's': address '255.255.255.255:80' is the broadcast address; a server needs a unicast address"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: \"224.0.0.1:80\" }]\n",
            "bad.yaml:4:35: service 'a' server 's': address '224.0.0.1:80' is a multicast address; a server needs a unicast address"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: \"[::]:80\" }]\n",
            "bad.yaml:4:35: service 'a' server 's': address '[::]:80' is the unspecified address; a server needs a unicast address"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: \"[ff02::1]:80\" }]\n",
            "bad.yaml:4:35: service 'a' server 's': address '[ff02::1]:80' is a multicast address; a server needs a unicast address"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:7000\"]\n    servers: [{ name: s, address: \"127.0.0.1:7000\" }]\n",
            "bad.yaml:4:15: service 'a' server 's': 127.0.0.1:7000 is this service's own bind (bad.yaml:3:12): every connection would come back to Ballast; set allow_self: true if a chain through Ballast is meant"
        ),
        (
            "services:\n  - name: a\n    bind: [\"0.0.0.0:7000\"]\n    servers: [{ name: s, address: \"127.0.0.1:7000\" }]\n",
            "bad.yaml:4:15: service 'a' server 's': 127.0.0.1:7000 is this service's own bind (bad.yaml:3:12): every connection would come back to Ballast; set allow_self: true if a chain through Ballast is meant"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:7000\"]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n  - name: b\n    bind: [\"127.0.0.1:7001\"]\n    servers: [{ name: t, address: \"127.0.0.1:7000\" }]\n",
            "bad.yaml:7:15: service 'b' server 't': 127.0.0.1:7000 is the bind of service 'a' (bad.yaml:3:12): every connection would come back to Ballast; set allow_self: true if a chain through Ballast is meant"
        ),
        (
            "global:\n  stats: { sockets: [{ address: \"127.0.0.1:7000\" }] }\nservices:\n  - name: a\n    bind: [\"0.0.0.0:7000\"]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:2:22: 127.0.0.1:7000 (a TCP stats socket) takes the same connections as 0.0.0.0:7000 (the bind of service 'a', bad.yaml:5:12)"
        ),
        (
            "global:\n  metrics: { address: \"127.0.0.1:7000\" }\nservices:\n  - name: a\n    bind: [\"127.0.0.1:7000\"]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:2:23: 127.0.0.1:7000 (the metrics endpoint) takes the same connections as 127.0.0.1:7000 (the bind of service 'a', bad.yaml:5:12)"
        ),
        (
            "global:\n  stats: { sockets: [{ path: /run/x.sock, level: admin, mode: 777 }] }\nservices:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:2:63: global.stats.sockets[0]: mode 777 lets every local user in at level admin (the runtime API has no authentication); use 600 or 660 with group, or set allow_world_writable: true"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    allow: [10.0.0.0/8, 10.0.0.300/32]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:25: service 'a': allow: '10.0.0.300/32' is not an IPv4 or IPv6 address or prefix (such as 10.0.0.0/8 or 2001:db8::/32)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    deny: [10.0.0.1/8]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:12: service 'a': deny: 10.0.0.1/8 has host bits set: the network is 10.0.0.0/8"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    allow: [\"2001:db8::/129\"]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:13: service 'a': allow: '2001:db8::/129': the prefix length is not a number within the address's bits"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    allow: [10.1.0.0/16]\n    deny: [10.0.0.0/8]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:5: service 'a': allow 10.1.0.0/16 is entirely inside deny 10.0.0.0/8: it admits nothing"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    allow: [10.0.0.0/8]\n    deny: [10.0.0.0/8]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:5: service 'a': 10.0.0.0/8 is in both allow and deny"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    deny: [10.0.0.0/8, 10.0.0.0/8]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:24: service 'a': deny: 10.0.0.0/8 is listed twice"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    limits: { new_conn_rate_per_source: 50 }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:41: service 'a' limits.new_conn_rate_per_source: '50' is not a rate (connections per s, m or h, such as 50/s)"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    limits: { conn_per_source: 0 }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:32: service 'a' limits.conn_per_source must be between 1 and 10000000, not 0"
        ),
        (
            "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    limits: { per_source: 5 }\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n",
            "bad.yaml:4:15: unknown key 'per_source' in service 'a' limits; expected one of: conn_per_source, new_conn_rate_per_source"
        ),
    ]

    @Test("accepted: slowstart 0s (off), allow_self, an operator socket open to all (with a warning), a 24-day timeout")
    func acceptedEdges() throws {
        let c = try ConfigLoader.load(
            path: "ok.yaml",
            contents: """
                global:
                  stats: { sockets: [{ path: /run/o.sock, mode: 666 }, { path: /run/a.sock, level: admin, mode: 777, allow_world_writable: true }] }
                services:
                  - name: a
                    bind: ["127.0.0.1:7000"]
                    slowstart: 0s
                    timeout: { client: 24d }
                    servers: [{ name: s, address: 10.0.0.1:1, slowstart: 0s }]
                  - name: b
                    bind: ["127.0.0.1:7001"]
                    servers: [{ name: t, address: "127.0.0.1:7000", allow_self: true }]
                """)
        #expect(c.services[0].servers[0].slowstart == Millis(0))
        #expect(c.services[1].servers[0].allowSelf)
        #expect(
            c.warnings == [
                "ok.yaml:2:49: global.stats.sockets[0]: mode 666 lets every local user in at level operator (they can drain servers and clear counters)"
            ])
        // The defaults give no warning.
        let plain = try ConfigLoader.load(
            path: "p.yaml",
            contents: "global:\n  stats: { sockets: [{ path: /run/p.sock }] }\nservices:\n"
                + Self.svc("a", "127.0.0.1:1"))
        #expect(plain.warnings.isEmpty)
    }

    @Test func freebindOnNatIsAnError() {
        let yaml =
            "services:\n  - name: a\n    mode: nat\n    bind: [{ address: \"10.0.0.100:80\", freebind: true }]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n"
        do {
            _ = try ConfigLoader.load(path: "bad.yaml", contents: yaml)
            Issue.record("accepted")
        } catch {
            #expect(
                error.description
                    == "bad.yaml:4:40: service 'a': freebind applies to proxy mode (nat mode matches the service address whether or not this host holds it)"
            )
        }
    }

    @Test("a check without timeout never outlasts its interval (as HAProxy); role checks start DOWN")
    func checkDefaults() throws {
        let c = try ConfigLoader.load(
            path: "c.yaml",
            contents: """
                services:
                  - name: a
                    bind: 127.0.0.1:1
                    check: { type: redis, role: master, interval: 300ms }
                    servers: [{ name: s, address: 127.0.0.1:2 }, { name: t, address: 127.0.0.1:3, check: { interval: 5s } }]
                """)
        let s = c.services[0].servers
        #expect(s[0].check?.timeout == Millis(300))
        #expect(s[1].check?.timeout == Defaults.checkTimeout)
        #expect(s[0].check?.effectiveInitState == .down)
        #expect(Server(config: s[0]).up.load(ordering: .relaxed) == false)
        var plain = CheckConfig()
        plain.type = .tcp
        #expect(plain.effectiveInitState == .fullyUp)
    }

    static func svc(_ name: String, _ bind: String) -> String {
        return "  - name: \(name)\n    bind: [\"\(bind)\"]\n    servers: [{ name: s, address: 10.0.0.1:1 }]\n"
    }

    @Test("bad configs are rejected with file:line:column", arguments: badConfigs.indices)
    func badConfig(index: Int) {
        var (yaml, expected) = Self.badConfigs[index]
        if yaml.hasPrefix("  - name:") { yaml = "services:\n" + yaml }
        #expect(throws: ConfigError.self) { try ConfigLoader.load(path: "bad.yaml", contents: yaml) }
        do {
            _ = try ConfigLoader.load(path: "bad.yaml", contents: yaml)
        } catch {
            #expect(error.description == expected)
        }
    }

    @Test func durations() {
        #expect(ConfigLoader.parseDuration("150ms") == Millis(150))
        #expect(ConfigLoader.parseDuration("2s") == Millis(2000))
        #expect(ConfigLoader.parseDuration("1m") == Millis(60_000))
        #expect(ConfigLoader.parseDuration("1h") == Millis(3_600_000))
        #expect(ConfigLoader.parseDuration("250") == Millis(250))
        #expect(ConfigLoader.parseDuration("2 s") == nil)
        #expect(ConfigLoader.parseDuration("s") == nil)
        #expect(ConfigLoader.parseDuration("1.5s") == nil)
    }

    /// The README's configuration reference states each default; it must match `Defaults`.
    @Test func readmeDefaultsMatchCode() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let readme = try String(contentsOf: root.appendingPathComponent("README.md"), encoding: .utf8)
        let expected: [(String, String)] = [
            ("global.maxconn", "\(Defaults.maxconn)"),
            ("global.pipe_size", "\(Defaults.pipeSize / 1024)k"),
            ("global.engine", Defaults.engine.rawValue),
            ("global.grace", "\(Defaults.grace)"),
            ("global.log.level", Defaults.logLevel.rawValue),
            ("global.log.format", Defaults.logFormat.rawValue),
            ("global.log.connections", "\(Defaults.logConnections)"),
            ("timeout.connect", "\(Defaults.connectTimeout)"),
            ("timeout.client", "\(Defaults.clientTimeout)"),
            ("timeout.server", "\(Defaults.serverTimeout)"),
            ("timeout.queue", "\(Defaults.queueTimeout)"),
            ("retries", "\(Defaults.retries)"),
            ("maxqueue", "\(Defaults.maxqueue)"),
            ("weight", "\(Defaults.weight)"),
            ("maxconn", "\(Defaults.serverMaxconn)"),
            ("balance", Defaults.balance.rawValue),
            ("hash_table_size", "\(Defaults.hashTableSize)"),
            ("global.stats.timeout", "\(Defaults.statsTimeout)"),
            ("global.stats.maxconn", "\(Defaults.statsMaxconn)"),
            ("global.stats.sockets[].level", Defaults.statsLevel.rawValue),
            ("global.stats.sockets[].mode", String(Defaults.statsMode, radix: 8)),
        ]
        for (key, value) in expected {
            let row = readme.split(separator: "\n").first { $0.hasPrefix("| `\(key)` |") }
            #expect(row != nil, "README has no row for \(key)")
            if let row {
                let cells = row.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
                #expect(
                    cells.count > 1 && cells[1] == "`\(value)`", "README says \(cells) for \(key); code says \(value)")
            }
        }
    }

    /// Every key the loader accepts is documented in the README's configuration section.
    @Test func readmeDocumentsEveryKey() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let readme = try String(contentsOf: root.appendingPathComponent("README.md"), encoding: .utf8)
        let lists: [(String, [String])] = [
            ("top", ConfigLoader.topKeys), ("global", ConfigLoader.globalKeys), ("log", ConfigLoader.logKeys),
            ("defaults", ConfigLoader.defaultsKeys), ("timeout", ConfigLoader.timeoutKeys),
            ("service", ConfigLoader.serviceKeys), ("server", ConfigLoader.serverKeys), ("bind", ConfigLoader.bindKeys),
            ("check", ConfigLoader.checkKeys), ("stats", ConfigLoader.statsKeys),
            ("stats socket", ConfigLoader.statsSocketKeys),
            ("metrics", ConfigLoader.metricsKeys), ("global nat", ConfigLoader.globalNatKeys),
            ("service nat", ConfigLoader.serviceNatKeys),
        ]
        for (section, keys) in lists {
            for key in keys {
                #expect(
                    readme.contains("`\(key)`") || readme.contains(".\(key)`") || readme.contains("`\(key) ")
                        || readme.contains("\(key):"),
                    "README does not document the \(section) key '\(key)'")
            }
        }
    }
}
