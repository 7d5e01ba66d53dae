import BallastCore
import CLinux

/// Network interfaces and their L2 neighbours (dsr mode).
public enum Interface {
    /// The interface's index, nil when there is none by that name. The corresponding C
    /// function is `if_nametoindex`.
    public static func index(_ name: String) -> UInt32? {
        let i = ballast_if_index(name)
        return i == 0 ? nil : i
    }

    /// The interface's MAC address. The corresponding C call is `ioctl(SIOCGIFHWADDR)`.
    public static func mac(_ name: String) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: 6)
        let r = out.withUnsafeMutableBufferPointer { ballast_if_mac(name, $0.baseAddress) }
        return r == 0 ? out : nil
    }

    /// Makes the kernel resolve `address`'s L2 neighbour on `device`: one empty UDP datagram
    /// to its discard port (9) out of that interface. The corresponding C calls are `socket`,
    /// `setsockopt(SO_BINDTODEVICE)` and `sendto`.
    public static func probeNeighbour(_ address: SocketAddress, device: String) {
        var a = address
        a.port = 9
        _ = a.withSockAddr { ballast_neighbour_probe($0, $1, device) }
    }

    /// `aa:bb:cc:dd:ee:ff`.
    public static func macText(_ mac: [UInt8]) -> String {
        mac.map { b in
            let h = String(b, radix: 16)
            return h.count == 1 ? "0" + h : h
        }.joined(separator: ":")
    }
}
