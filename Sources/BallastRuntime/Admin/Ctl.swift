import BallastCore
import BallastIO
import BallastNat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// `ballast ctl`: the runtime API from the shell, like `echo CMD | socat - UNIX:sock`, and an
/// interactive prompt with line editing and history when no command is given.
public enum Ctl {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// The socket to use: `--socket` as given, else the highest-level socket of the config.
    public static func socketFromConfig(_ config: Config) -> String? {
        let best = config.global.stats.sockets.max { $0.level < $1.level }
        return best.map { $0.path ?? $0.address!.description }
    }

    /// Connects to a Unix socket path, or to `ip:port` over TCP.
    public static func connect(_ target: String) throws(Failure) -> Int32 {
        if target.hasPrefix("/") || target.hasPrefix(".") || !target.contains(":") {
            do { return try Socket.connectUnix(target) } catch {
                throw Failure(description: "cannot connect to \(target): \(String(cString: strerror(error.errno)))")
            }
        }
        let address: SocketAddress
        do { address = try SocketAddress(parsing: target) } catch { throw Failure(description: "\(target): \(error)") }
        do { return try Socket.connectBlocking(address) } catch {
            throw Failure(description: "cannot connect to \(target): \(String(cString: strerror(error.errno)))")
        }
    }

    static func writeAll(_ fd: Int32, _ text: String) -> Bool { Sys.writeAll(fd, Array(text.utf8)) }

    static func out(_ bytes: [UInt8]) { Sys.writeAll(1, bytes) }

    /// Runs one command (or the interactive prompt when `command` is empty); returns an error
    /// text on failure.
    public static func main(target: String, command: [String]) -> String? {
        do {
            if command.isEmpty { try interactive(target) } else { try once(target, command.joined(separator: " ")) }
            return nil
        } catch {
            return error.description
        }
    }

    /// Sends one command line and copies the reply to standard output until the server closes.
    public static func once(_ target: String, _ command: String) throws(Failure) {
        out(try ask(target, command))
    }

    /// Sends one command line and returns the whole reply.
    static func ask(_ target: String, _ command: String) throws(Failure) -> [UInt8] {
        let fd = try connect(target)
        defer { Sys.close(fd) }
        // A node that does not answer must not hold the others up (10 s receive timeout).
        guard writeAll(fd, command + "\n") else { throw Failure(description: "cannot send to \(target)") }
        var reply: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let r = try? buf.withUnsafeMutableBytes { b throws(SysError) in
                try Sys.readBlocking(fd, b.baseAddress!, b.count)
            }
            guard let r else { break }
            guard case .done(let n) = r else { throw Failure(description: "no answer from \(target) within 10 s") }
            if n == 0 { break }
            reply += buf[0..<n]
        }
        return reply
    }

    /// Commands that change something answer nothing on success (HAProxy's convention); any
    /// text is the error (`No such server.`, `Permission denied`, …).
    static func isAction(_ command: String) -> Bool {
        let first = command.split(separator: " ").first.map(String.init) ?? ""
        return ["set", "enable", "disable", "shutdown", "clear", "add", "del"].contains(first)
    }

    /// `ballast ctl --socket A --socket B CMD`: runs the command on every node given (each a
    /// target, or `name=target`), prints each reply under the node's name, and returns the nodes
    /// that failed (unreachable, or an action command that answered an error).
    public static func many(_ nodes: [String], command: String) -> [String] {
        var failed: [String] = []
        for node in nodes {
            var name = node
            var target = node
            if let eq = node.firstIndex(of: "="), !node.hasPrefix("/") {
                name = String(node[..<eq])
                target = String(node[node.index(after: eq)...])
            }
            let label = name == target ? name : "\(name) (\(target))"
            do {
                let reply = try ask(target, command)
                let text = String(decoding: reply, as: UTF8.self)
                let error = isAction(command) && text.contains { !$0.isWhitespace }
                out(Array("== \(label)\(error ? ": FAILED" : "") ==\n".utf8))
                out(reply)
                if error { failed.append(name) }
            } catch {
                out(Array("== \(label): FAILED: \(error.description) ==\n\n".utf8))
                failed.append(name)
            }
        }
        return failed
    }

    /// Reads until the reply ends with the `> ` prompt (or the server closes). nil: closed.
    static func readReply(_ fd: Int32) -> (text: [UInt8], open: Bool) {
        var reply: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let r = try? buf.withUnsafeMutableBytes { b throws(SysError) in
                try Sys.readBlocking(fd, b.baseAddress!, b.count)
            }
            guard case .done(let n)? = r, n > 0 else { return (reply, false) }
            reply += buf[0..<n]
            if reply.count >= 2 && reply[reply.count - 2] == UInt8(ascii: ">")
                && reply[reply.count - 1] == UInt8(ascii: " ")
                && (reply.count == 2 || reply[reply.count - 3] == UInt8(ascii: "\n"))
            {
                return (Array(reply.dropLast(2)), true)
            }
        }
    }

    /// The interactive prompt: keeps one connection in HAProxy's prompt mode (reconnecting after
    /// the server's idle timeout), with history in `~/.ballast_history`.
    public static func interactive(_ target: String) throws(Failure) {
        var fd: Int32 = -1
        func open() throws(Failure) {
            fd = try connect(target)
            guard writeAll(fd, "prompt\n") else { throw Failure(description: "cannot send to \(target)") }
            _ = readReply(fd)
        }
        try open()
        let editor = LineEditor(historyFile: getenv("HOME").map { String(cString: $0) + "/.ballast_history" })
        defer { editor.save() }
        while let line = editor.read(prompt: "ballast> ") {
            let trimmed = line.drop { $0 == " " }
            if trimmed.isEmpty { continue }
            if trimmed == "quit" || trimmed == "exit" { break }
            var sent = fd >= 0 && writeAll(fd, line + "\n")
            var (reply, isOpen) = sent ? readReply(fd) : ([], false)
            if !isOpen && reply.isEmpty {
                // The server closed an idle session: reconnect and send again.
                close(fd)
                try open()
                sent = writeAll(fd, line + "\n")
                (reply, isOpen) = sent ? readReply(fd) : ([], false)
            }
            out(reply)
            if !isOpen {
                close(fd)
                fd = -1
                try open()
            }
        }
        if fd >= 0 { close(fd) }
    }
}

/// A small line editor for the interactive prompt: arrows, Home/End, Ctrl-A/E/U/C/D, history.
/// Without a terminal it just reads lines.
final class LineEditor {
    private var history: [String] = []
    private let historyFile: String?
    private let tty = isatty(0) != 0

    init(historyFile: String?) {
        self.historyFile = historyFile
        if let f = historyFile, let fp = fopen(f, "r") {
            var line: UnsafeMutablePointer<CChar>?
            var cap = 0
            while getline(&line, &cap, fp) > 0 {
                var s = String(cString: line!)
                if s.hasSuffix("\n") { s.removeLast() }
                if !s.isEmpty { history.append(s) }
            }
            free(line)
            fclose(fp)
        }
    }

    func save() {
        guard let f = historyFile, let fp = fopen(f, "w") else { return }
        for h in history.suffix(500) { fputs(h + "\n", fp) }
        fclose(fp)
    }

    private func readByte() -> UInt8? {
        var b: UInt8 = 0
        guard case .done(1)? = try? Sys.readBlocking(0, &b, 1) else { return nil }
        return b
    }

    func read(prompt: String) -> String? {
        guard tty else {
            var bytes: [UInt8] = []
            while let b = readByte() {
                if b == 10 { return String(decoding: bytes, as: UTF8.self) }
                bytes.append(b)
            }
            return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
        }
        var saved = termios()
        tcgetattr(0, &saved)
        var raw = saved
        raw.c_lflag &= ~tcflag_t(ECHO | ICANON | ISIG)
        tcsetattr(0, TCSAFLUSH, &raw)
        defer { tcsetattr(0, TCSAFLUSH, &saved) }
        var buf: [Character] = []
        var cursor = 0
        var index = history.count
        func redraw() {
            let text =
                "\r" + prompt + String(buf) + "\u{1b}[K" + (cursor < buf.count ? "\u{1b}[\(buf.count - cursor)D" : "")
            Ctl.out(Array(text.utf8))
        }
        redraw()
        while let b = readByte() {
            switch b {
            case 13, 10:
                Ctl.out(Array("\r\n".utf8))
                let line = String(buf)
                if !line.isEmpty && history.last != line { history.append(line) }
                return line
            case 3:
                buf = []
                cursor = 0
                Ctl.out(Array("^C\r\n".utf8))
                redraw()
            case 4:
                if buf.isEmpty {
                    Ctl.out(Array("\r\n".utf8))
                    return nil
                }
            case 1:
                cursor = 0
                redraw()
            case 5:
                cursor = buf.count
                redraw()
            case 21:
                buf.removeFirst(cursor)
                cursor = 0
                redraw()
            case 127, 8:
                if cursor > 0 {
                    buf.remove(at: cursor - 1)
                    cursor -= 1
                    redraw()
                }
            case 27:
                guard readByte() == UInt8(ascii: "["), let k = readByte() else { continue }
                switch k {
                case UInt8(ascii: "A"):
                    if index > 0 {
                        index -= 1
                        buf = Array(history[index])
                        cursor = buf.count
                    }
                case UInt8(ascii: "B"):
                    if index < history.count {
                        index += 1
                        buf = index < history.count ? Array(history[index]) : []
                        cursor = buf.count
                    }
                case UInt8(ascii: "C"): cursor = min(buf.count, cursor + 1)
                case UInt8(ascii: "D"): cursor = max(0, cursor - 1)
                case UInt8(ascii: "H"): cursor = 0
                case UInt8(ascii: "F"): cursor = buf.count
                case UInt8(ascii: "3"):
                    _ = readByte()  // "~": Delete
                    if cursor < buf.count { buf.remove(at: cursor) }
                default: break
                }
                redraw()
            default:
                if b >= 32 && b < 127 {
                    buf.insert(Character(Unicode.Scalar(b)), at: cursor)
                    cursor += 1
                    redraw()
                }
            }
        }
        return nil
    }
}

/// `ballast nft show -c FILE`: the ruleset a config would program.
public enum NatRendering {
    public static func render(_ config: Config) -> String { NatController.render(config: config) }
}
