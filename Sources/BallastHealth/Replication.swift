import BallastCore

/// What one check concluded.
public struct Verdict: Sendable, Equatable {
    public var status: CheckStatus
    /// HTTP status, MySQL error code.
    public var code: Int?
    public var detail: String
    /// The server said what it is (the wrong role, `read_only`, replication stopped or behind):
    /// such an answer changes the server's state at once instead of waiting for `fall` (which
    /// is for timeouts and errors, where one answer may be noise).
    public var definite = false
    /// Redis: what `INFO replication` said, for the service's master arbiter.
    public var replication: RedisReplication?

    public init(
        _ status: CheckStatus, code: Int? = nil, _ detail: String, definite: Bool = false,
        replication: RedisReplication? = nil
    ) {
        self.status = status
        self.code = code
        self.detail = detail
        self.definite = definite
        self.replication = replication
    }
}

/// Keeps a `role: master` service at one master. Each server whose check answers `role:master`
/// is a claim; the arbiter decides which claim takes writes:
///
/// 1. With Sentinel, the server Sentinel names (the last address a majority agreed on, or the
///    last `+switch-master`); every other claim is refused.
/// 2. Without Sentinel (or before any Sentinel ever answered), the replication history: a
///    promoted replica keeps its old master's id as `master_replid2`, so a claimer whose
///    `master_replid` is another claimer's `master_replid2` is the stale one.
/// 3. When the history cannot tell (a master restarted empty has a fresh id and no second id),
///    the server already serving keeps the writes and the newcomer is held down.
///
/// Runs on the checker thread only.
public struct MasterArbiter: Sendable {
    public struct Claim: Sendable, Equatable {
        public var name: String
        public var address: SocketAddress
        public var replid: String
        public var replid2: String
    }

    public enum Decision: Sendable, Equatable {
        /// The claim takes writes. `takeover`: it just became the holder from another claim (or
        /// by Sentinel's word), so it goes UP at once; `demote`: servers (by key) to take down at
        /// once, with the reason.
        case accept(takeover: Bool, demote: [Int: String])
        /// Refused, with the reason shown as the check's detail.
        case refuse(String)
    }

    /// Claims by server key (the checker's stable per-server id).
    public private(set) var claims: [Int: Claim] = [:]
    public private(set) var holder: Int?
    /// Sentinel configured for the service.
    public let usesSentinel: Bool
    /// The master Sentinel names now; nil until a majority first agreed.
    public private(set) var named: SocketAddress?

    static let noHistory = String(repeating: "0", count: 40)

    public init(usesSentinel: Bool) { self.usesSentinel = usesSentinel }

    /// Sentinel named `address` the master. Returns the claimers (other than the named one) to
    /// take down at once.
    public mutating func sentinelNamed(_ address: SocketAddress) -> [Int: String] {
        named = address
        var demote: [Int: String] = [:]
        for (k, c) in claims where c.address != address {
            demote[k] = "not the master named by sentinel (\(address))"
        }
        if let h = holder, claims[h]?.address != address { holder = nil }
        return demote
    }

    /// A server answered `role:master`.
    public mutating func masterAnswer(_ key: Int, _ claim: Claim) -> Decision {
        claims[key] = claim
        if usesSentinel, let named {
            guard claim.address == named else { return .refuse("not the master named by sentinel (\(named))") }
            let takeover = holder != key
            holder = key
            var demote: [Int: String] = [:]
            for k in claims.keys where k != key { demote[k] = "not the master named by sentinel (\(named))" }
            return .accept(takeover: takeover, demote: demote)
        }
        // A claimer promoted from this server's replicas: this server is the stale master.
        if claim.replid != Self.noHistory && !claim.replid.isEmpty {
            for (k, c) in claims where k != key && c.replid2 == claim.replid {
                if holder == key { holder = k }
                return .refuse(
                    "stale master: \(c.name) was promoted from its replica (its master_replid2 is this server's master_replid)"
                )
            }
        }
        // This server was promoted from another claimer's replicas: it takes over.
        var demote: [Int: String] = [:]
        if claim.replid2 != Self.noHistory && !claim.replid2.isEmpty {
            for (k, c) in claims where k != key && c.replid == claim.replid2 {
                demote[k] =
                    "stale master: \(claim.name) was promoted from its replica (its master_replid2 is this server's master_replid)"
            }
        }
        if !demote.isEmpty {
            holder = key
            return .accept(takeover: true, demote: demote)
        }
        if let h = holder, h != key, let other = claims[h] {
            return .refuse(
                "another master (\(other.name)) already takes the writes and the replication history cannot tell which is newer; held down until it stops being master"
            )
        }
        let takeover = holder != key && holder != nil
        holder = key
        return .accept(takeover: takeover, demote: [:])
    }

    /// A server answered something else (a replica, an error), could not be reached, or left
    /// the service: it claims nothing any more.
    public mutating func noClaim(_ key: Int) {
        claims[key] = nil
        if holder == key { holder = nil }
    }

}
