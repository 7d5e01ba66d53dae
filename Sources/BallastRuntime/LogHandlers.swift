import BallastCore
import BallastIO
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Writes one line per record to stderr, as text (`2026-11-25T18:00:00.123Z info message key=value`)
/// or as a JSON object. One `write(2)` per line so lines from several threads never interleave.
public struct LineLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    let label: String

    public init(label: String) {
        self.label = label
    }

    public var logLevel: Logger.Level {
        get { LogState.currentLevel }
        set {}
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let m = event.metadata { all.merge(m) { $1 } }
        let ts = LineLogHandler.timestamp()
        var line: String
        switch LogState.json.load(ordering: .relaxed) ? LogFormat.json : .text {
        case .text:
            line = "\(ts) \(event.level) \(event.message)"
            for key in all.keys.sorted() { line += " \(key)=\(LineLogHandler.textValue("\(all[key]!)"))" }
        case .json:
            line =
                "{\"ts\":\"\(ts)\",\"level\":\"\(event.level)\",\"msg\":\(LineLogHandler.jsonString("\(event.message)"))"
            for key in all.keys.sorted() {
                line += ",\(LineLogHandler.jsonString(key)):\(LineLogHandler.jsonString("\(all[key]!)"))"
            }
            line += "}"
        }
        line += "\n"
        Sys.writeAll(2, Array(line.utf8))
    }

    static func textValue(_ v: String) -> String {
        v.contains(" ") || v.isEmpty ? "\"\(v)\"" : v
    }

    static func jsonString(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let hex = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }

    static func timestamp() -> String {
        let ts = wallClock()
        var t = ts.tv_sec
        var tmv = tm()
        gmtime_r(&t, &tmv)
        func pad(_ v: Int32, _ w: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, w - s.count)) + s
        }
        return "\(pad(tmv.tm_year + 1900, 4))-\(pad(tmv.tm_mon + 1, 2))-\(pad(tmv.tm_mday, 2))T"
            + "\(pad(tmv.tm_hour, 2)):\(pad(tmv.tm_min, 2)):\(pad(tmv.tm_sec, 2)).\(pad(Int32(ts.tv_nsec / 1_000_000), 3))Z"
    }
}

extension LogLevel {
    var swiftLog: Logger.Level {
        switch self {
        case .trace: return .trace
        case .debug: return .debug
        case .info: return .info
        case .notice: return .notice
        case .warning: return .warning
        case .error: return .error
        case .critical: return .critical
        }
    }
}

/// Logging is bootstrapped once per process; level and format then follow the config through
/// these atomics, so a reload changes them for every thread's logger at once.
enum LogState {
    static let level = Atomic<UInt8>(2)
    static let json = Atomic<Bool>(false)

    static let levels: [Logger.Level] = [.trace, .debug, .info, .notice, .warning, .error, .critical]

    static func set(_ config: LogConfig) {
        level.store(UInt8(levels.firstIndex(of: config.level.swiftLog)!), ordering: .relaxed)
        json.store(config.format == .json, ordering: .relaxed)
    }

    static var currentLevel: Logger.Level { levels[Int(level.load(ordering: .relaxed))] }
}
