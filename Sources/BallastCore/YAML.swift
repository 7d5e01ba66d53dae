/// The YAML Ballast's configuration files are written in, read without Foundation: block and flow
/// mappings and sequences, plain, single- and double-quoted scalars, literal and folded block
/// scalars, comments, anchors and aliases, one document. Every node keeps the line and column it
/// starts at, for errors that name them. Not supported (an error that says so): tags other than
/// the core schema's `!!str`, directives, several documents in one file, complex keys (`? `).
///
/// Why not Yams: it is libyaml plus Foundation, and Foundation brings its internationalization
/// data: 40 MB of the static binary and 10 MiB of resident memory for reading a config file.
public indirect enum YAMLNode: Sendable, Equatable {
    case scalar(Scalar, Mark)
    case mapping([(key: YAMLNode, value: YAMLNode)], Mark)
    case sequence([YAMLNode], Mark)

    public struct Mark: Sendable, Equatable {
        public var line: Int
        public var column: Int

        public init(line: Int, column: Int) {
            self.line = line
            self.column = column
        }
    }

    public struct Scalar: Sendable, Equatable {
        public var string: String
        /// Written without quotes or a block indicator (so `~`, `null` and nothing mean null).
        public var plain: Bool

        /// A plain `~`, `null` or nothing: YAML's null.
        public var isNull: Bool {
            plain && (string.isEmpty || string == "~" || string == "null" || string == "Null" || string == "NULL")
        }
    }

    public var mark: Mark {
        switch self {
        case .scalar(_, let m), .mapping(_, let m), .sequence(_, let m): return m
        }
    }

    /// The text of a scalar node; nil for a collection.
    public var string: String? {
        if case .scalar(let s, _) = self { return s.string }
        return nil
    }

    public static func == (a: YAMLNode, b: YAMLNode) -> Bool {
        switch (a, b) {
        case (.scalar(let x, _), .scalar(let y, _)): return x == y
        case (.sequence(let x, _), .sequence(let y, _)): return x == y
        case (.mapping(let x, _), .mapping(let y, _)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.key == $1.key && $0.value == $1.value }
        default: return false
        }
    }

    /// A canonical text of the node's content (no marks): equal for equal trees.
    public var canonical: String {
        var out = ""
        write(into: &out)
        return out
    }

    private func write(into out: inout String) {
        switch self {
        case .scalar(let s, _):
            out += s.plain ? "p" : "q"
            out += String(s.string.utf8.count)
            out += ":"
            out += s.string
        case .sequence(let items, _):
            out += "["
            for i in items {
                i.write(into: &out)
                out += ","
            }
            out += "]"
        case .mapping(let pairs, _):
            out += "{"
            for p in pairs {
                p.key.write(into: &out)
                out += "="
                p.value.write(into: &out)
                out += ","
            }
            out += "}"
        }
    }

    /// Parses one YAML document; nil when it holds no node (empty, or only comments).
    public static func parse(_ text: String) throws(YAMLError) -> YAMLNode? {
        var p = YAMLParser(Array(text.utf8))
        return try p.document()
    }
}

/// Where and why a text is not YAML Ballast reads.
public struct YAMLError: Error, Sendable, Equatable {
    public var line: Int
    public var column: Int
    public var message: String
}

struct YAMLParser {
    let b: [UInt8]
    var i = 0
    var line = 1
    var lineStart = 0
    var anchors: [String: YAMLNode] = [:]
    var depth = 0

    init(_ bytes: [UInt8]) { b = bytes }

    // MARK: - Characters

    @inline(__always) func peek(_ k: Int = 0) -> UInt8 { i + k < b.count ? b[i + k] : 0 }
    var atEnd: Bool { i >= b.count }
    var column: Int { i - lineStart + 1 }
    var mark: YAMLNode.Mark { YAMLNode.Mark(line: line, column: column) }

    func error(_ message: String, at m: YAMLNode.Mark? = nil) -> YAMLError {
        let m = m ?? mark
        return YAMLError(line: m.line, column: m.column, message: message)
    }

    mutating func advance() {
        if b[i] == 10 {
            line += 1
            lineStart = i + 1
        }
        i += 1
    }

    @inline(__always) static func isSpace(_ c: UInt8) -> Bool { c == 32 || c == 9 }
    @inline(__always) static func isBreak(_ c: UInt8) -> Bool { c == 10 || c == 13 || c == 0 }
    @inline(__always) static func isBlank(_ c: UInt8) -> Bool { isSpace(c) || isBreak(c) }

    /// Skips spaces and a comment on this line (not the line break).
    mutating func skipInline() {
        while Self.isSpace(peek()) { i += 1 }
        if peek() == UInt8(ascii: "#") { while !Self.isBreak(peek()) { i += 1 } }
    }

    /// Skips spaces, comments and line breaks; then the column of the next content (nil at end).
    /// A tab where indentation is measured is an error, as in YAML.
    mutating func skipToContent() throws(YAMLError) -> Int? {
        while !atEnd {
            let c = peek()
            if c == 32 {
                i += 1
            } else if c == 9 {
                if i == lineStart || b[lineStart..<i].allSatisfy({ $0 == 32 }) {
                    // Tabs only before a comment or the end of the line are harmless.
                    var k = i
                    while k < b.count && Self.isSpace(b[k]) { k += 1 }
                    if k < b.count && !Self.isBreak(b[k]) && b[k] != UInt8(ascii: "#") {
                        throw error("a tab indents this line; YAML indents with spaces only")
                    }
                }
                i += 1
            } else if c == UInt8(ascii: "#") {
                while !Self.isBreak(peek()) { i += 1 }
            } else if c == 10 || c == 13 {
                advance()
            } else {
                return column
            }
        }
        return nil
    }

    // MARK: - Document

    mutating func document() throws(YAMLError) -> YAMLNode? {
        if b.starts(with: [0xEF, 0xBB, 0xBF]) { i = 3 }
        guard try skipToContent() != nil else { return nil }
        if peek() == UInt8(ascii: "%") { throw error("YAML directives are not supported") }
        if isMarker("---") {
            i += 3
            skipInline()
        }
        guard let c = try skipToContent(), !isMarker("...") else { return nil }
        let node = try blockNode(column: c, parent: -1)
        if (try skipToContent()) != nil {
            if isMarker("...") {
                i += 3
                if try skipToContent() == nil { return node }
            }
            if isMarker("---") { throw error("only one YAML document per file") }
            throw error("unexpected content here: not part of the structure above (check the indentation)")
        }
        return node
    }

    /// `---` or `...` at the start of a line, followed by a blank.
    func isMarker(_ m: String) -> Bool {
        let bytes = Array(m.utf8)
        guard i == lineStart, i + 3 <= b.count, Array(b[i..<i + 3]) == bytes else { return false }
        return Self.isBlank(peek(3))
    }

    // MARK: - Block structure

    /// A node starting at the current position, which is at column `column`, inside a block
    /// collection whose entries sit at column `parent`.
    /// `inline`: the value of a block mapping entry on the key's line, where only a scalar, a flow
    /// collection or an alias may follow (`a: b: c` and `a: - b` are errors, as in YAML).
    mutating func blockNode(column: Int, parent: Int, inline: Bool = false) throws(YAMLError) -> YAMLNode {
        depth += 1
        defer { depth -= 1 }
        if depth > 200 { throw error("nested too deeply") }
        let start = mark
        // Properties (an anchor, a tag) alone on their line belong to the node on the lines
        // below; followed by more on the same line they belong to what follows (a key, a value),
        // which `inlineNode` reads with them.
        let save = (i, line, lineStart)
        var anchor: String?
        var verbatim = false
        while peek() == UInt8(ascii: "&") || peek() == UInt8(ascii: "!") {
            if peek() == UInt8(ascii: "&") {
                anchor = try name(after: "&")
            } else {
                verbatim = try tag()
            }
            skipInline()
        }
        if anchor != nil || verbatim || i != save.0 {
            if Self.isBreak(peek()) {
                guard let c = try skipToContent(), c > parent else {
                    let node = YAMLNode.scalar(.init(string: "", plain: !verbatim), start)
                    if let anchor { anchors[anchor] = node }
                    return node
                }
                let node = try blockNode(column: c, parent: parent)
                if let anchor { anchors[anchor] = node }
                return node
            }
            (i, line, lineStart) = save
        }
        let node: YAMLNode
        if !inline && peek() == UInt8(ascii: "-") && Self.isBlank(peek(1)) {
            node = try blockSequence(column: column)
        } else if !inline, try startsMappingKey() {
            node = try blockMapping(column: column)
        } else {
            if inline && peek() == UInt8(ascii: "-") && Self.isBlank(peek(1)) {
                throw error("a sequence cannot start on its key's line: put '- ' entries on the lines below")
            }
            node = try inlineNode(parent: parent, verbatim: verbatim)
            skipInline()
            if !Self.isBreak(peek()) {
                if peek() == UInt8(ascii: ":") {
                    throw error("': ' inside a plain value (a mapping cannot start here): quote the value")
                }
                throw error("unexpected text after a value")
            }
        }
        return node
    }

    mutating func blockSequence(column: Int) throws(YAMLError) -> YAMLNode {
        let start = mark
        var items: [YAMLNode] = []
        while true {
            // At a '-' in `column`.
            i += 1
            skipInline()
            if Self.isBreak(peek()) {
                let itemMark = mark
                if let c = try skipToContent(), c > column {
                    items.append(try blockNode(column: c, parent: column))
                } else {
                    items.append(.scalar(.init(string: "", plain: true), itemMark))
                }
            } else {
                items.append(try blockNode(column: self.column, parent: column))
            }
            guard let c = try skipToContent() else { break }
            if c < column || isMarker("...") || isMarker("---") { break }
            if c > column { throw error("bad indentation: deeper than the sequence above it") }
            guard peek() == UInt8(ascii: "-") && Self.isBlank(peek(1)) else { break }
        }
        return .sequence(items, start)
    }

    mutating func blockMapping(column: Int) throws(YAMLError) -> YAMLNode {
        let start = mark
        var pairs: [(key: YAMLNode, value: YAMLNode)] = []
        var seen: Set<String> = []
        while true {
            let key = try inlineNode(parent: column, key: true)
            skipInlineSpacesOnly()
            guard peek() == UInt8(ascii: ":") else {
                throw error("expected ':' after the key \(key.string.map { "'\($0)'" } ?? "")")
            }
            i += 1
            if let k = key.string, !seen.insert(k).inserted {
                throw error("duplicate key '\(k)' in the mapping that starts here", at: start)
            }
            skipInline()
            let value: YAMLNode
            if Self.isBreak(peek()) {
                let valueMark = mark
                if let c = try skipToContent(),
                    c > column || (c == column && peek() == UInt8(ascii: "-") && Self.isBlank(peek(1)))
                {
                    if c == column {
                        value = try blockSequence(column: c)
                    } else {
                        value = try blockNode(column: c, parent: column)
                    }
                } else {
                    value = .scalar(.init(string: "", plain: true), valueMark)
                }
            } else {
                value = try blockNode(column: self.column, parent: column, inline: true)
            }
            pairs.append((key, value))
            guard let c = try skipToContent() else { break }
            if c < column || isMarker("...") || isMarker("---") { break }
            if c > column { throw error("bad indentation: deeper than the key above it") }
            guard try startsMappingKey() else {
                if peek() == UInt8(ascii: "-") && Self.isBlank(peek(1)) {
                    throw error("a sequence entry where a key of the mapping above was expected")
                }
                throw error("expected a key ('name: value') at this indentation")
            }
        }
        return .mapping(pairs, start)
    }

    mutating func skipInlineSpacesOnly() { while Self.isSpace(peek()) { i += 1 } }

    /// Whether the current line, from here, is `key:` followed by a blank (a block mapping entry).
    mutating func startsMappingKey() throws(YAMLError) -> Bool {
        let save = (i, line, lineStart)
        defer { (i, line, lineStart) = save }
        let c = peek()
        if c == UInt8(ascii: "[") || c == UInt8(ascii: "{") || c == UInt8(ascii: "|") || c == UInt8(ascii: ">")
            || c == UInt8(ascii: "*") || c == UInt8(ascii: "#")
        {
            return false
        }
        if c == UInt8(ascii: "?") && Self.isBlank(peek(1)) { throw error("complex keys ('? ') are not supported") }
        if c == UInt8(ascii: "\"") || c == UInt8(ascii: "'") {
            do {
                _ = try quoted()
            } catch {
                return false
            }
            if line != save.1 { return false }
        } else {
            // A plain scalar on this line up to ': ' or ':' at the end.
            while !Self.isBreak(peek()) {
                if peek() == UInt8(ascii: ":") && Self.isBlank(peek(1)) { return true }
                if Self.isSpace(peek()) && peek(1) == UInt8(ascii: "#") { return false }
                i += 1
            }
            return false
        }
        skipInlineSpacesOnly()
        return peek() == UInt8(ascii: ":") && Self.isBlank(peek(1))
    }

    // MARK: - Nodes on one line (and flow collections, which may span lines)

    /// A scalar, flow collection, alias or block scalar starting here. `key`: a block mapping
    /// key (a plain one ends at ': ').
    mutating func inlineNode(parent: Int, key: Bool = false, verbatim: Bool = false) throws(YAMLError) -> YAMLNode {
        var anchor: String?
        var verbatim = verbatim
        while peek() == UInt8(ascii: "&") || peek() == UInt8(ascii: "!") {
            if peek() == UInt8(ascii: "&") { anchor = try name(after: "&") } else { verbatim = try tag() }
            skipInlineSpacesOnly()
        }
        let node = try inlineContent(parent: parent, key: key, verbatim: verbatim)
        if let anchor { anchors[anchor] = node }
        return node
    }

    mutating func inlineContent(parent: Int, key: Bool, verbatim: Bool) throws(YAMLError) -> YAMLNode {
        let start = mark
        switch peek() {
        case UInt8(ascii: "["), UInt8(ascii: "{"):
            if key { throw error("a collection cannot be a key") }
            return try flowCollection()
        case UInt8(ascii: "\""), UInt8(ascii: "'"):
            return .scalar(.init(string: try quoted(), plain: false), start)
        case UInt8(ascii: "*"):
            let n = try name(after: "*")
            guard let node = anchors[n] else {
                throw error("alias '*\(n)' names no anchor defined before it", at: start)
            }
            return node
        case UInt8(ascii: "|"), UInt8(ascii: ">"):
            if key { throw error("a block scalar cannot be a key") }
            return .scalar(.init(string: try blockScalar(parent: parent), plain: false), start)
        case UInt8(ascii: "@"), UInt8(ascii: "`"):
            throw error("'\(Character(UnicodeScalar(peek())))' cannot start a plain value; quote it")
        case UInt8(ascii: "%"):
            if i == lineStart { throw error("YAML directives are not supported") }
            return .scalar(.init(string: plainBlock(key: key), plain: !verbatim), start)
        default:
            var text = plainBlock(key: key)
            if !key { text += continuation(parent: parent) }
            return .scalar(.init(string: text, plain: !verbatim), start)
        }
    }

    /// The lines that continue a multi-line plain value, folded into it with a space (an empty
    /// line with a newline). In a block, only lines more indented than `parent`; in a flow
    /// collection, until an indicator. A comment line ends the value.
    mutating func continuation(parent: Int, flow: Bool = false) -> String {
        var out = ""
        while true {
            skipInlineSpacesOnly()
            guard peek() == 10 || peek() == 13 else { return out }
            var k = i
            var breaks = 0
            var lineAt = i
            while k < b.count && (b[k] == 10 || b[k] == 13 || b[k] == 32 || (flow && b[k] == 9)) {
                if b[k] == 10 {
                    breaks += 1
                    lineAt = k + 1
                }
                k += 1
            }
            guard k < b.count, b[k] != UInt8(ascii: "#") else { return out }
            let c = b[k]
            if flow {
                if c == UInt8(ascii: ",") || c == UInt8(ascii: "]") || c == UInt8(ascii: "}")
                    || c == UInt8(ascii: "[") || c == UInt8(ascii: "{")
                    || (c == UInt8(ascii: ":") && (k + 1 >= b.count || Self.isBlank(b[k + 1])))
                {
                    return out
                }
            } else {
                guard k - lineAt + 1 > parent, c != 9 else { return out }
                // A document marker at the start of a line ends everything.
                if k == lineAt && k + 3 <= b.count
                    && (Array(b[k..<k + 3]) == Array("---".utf8) || Array(b[k..<k + 3]) == Array("...".utf8))
                {
                    return out
                }
            }
            while i < k { advance() }
            out += breaks > 1 ? String(repeating: "\n", count: breaks - 1) : " "
            out += flow ? flowPlainLine() : plainBlock(key: false)
        }
    }

    /// A plain scalar in block context: to the end of the line (before a comment), or for a key
    /// to ': '. Continuation lines of a multi-line plain scalar are not read (none in a config).
    mutating func plainBlock(key: Bool) -> String {
        let s = i
        var end = i
        while !Self.isBreak(peek()) {
            let c = peek()
            if c == UInt8(ascii: ":") && Self.isBlank(peek(1)) {
                if key { break }
                break
            }
            if Self.isSpace(c) && peek(1) == UInt8(ascii: "#") { break }
            i += 1
            if !Self.isSpace(c) { end = i }
        }
        i = max(i, s)
        let text = String(decoding: b[s..<end], as: UTF8.self)
        // Leave the position just after the scalar's last character (spaces are skipped later).
        i = end
        return text
    }

    mutating func name(after sigil: String) throws(YAMLError) -> String {
        i += 1
        let s = i
        while !Self.isBlank(peek()) && peek() != UInt8(ascii: ",") && peek() != UInt8(ascii: "]")
            && peek() != UInt8(ascii: "}") && peek() != UInt8(ascii: "[") && peek() != UInt8(ascii: "{")
        {
            i += 1
        }
        if s == i { throw error("'\(sigil)' needs a name") }
        return String(decoding: b[s..<i], as: UTF8.self)
    }

    /// A tag: `!!str` keeps the value a string (true); other core tags are accepted as no-ops.
    mutating func tag() throws(YAMLError) -> Bool {
        let m = mark
        let s = i
        while !Self.isBlank(peek()) { i += 1 }
        let t = String(decoding: b[s..<i], as: UTF8.self)
        switch t {
        case "!!str": return true
        case "!!int", "!!bool", "!!float", "!!null", "!!map", "!!seq": return false
        default: throw error("the tag '\(t)' is not supported", at: m)
        }
    }

    mutating func quoted() throws(YAMLError) -> String {
        let start = mark
        let q = peek()
        i += 1
        var out: [UInt8] = []
        while true {
            guard !atEnd else {
                throw error("a quoted value that starts here is not closed", at: start)
            }
            let c = peek()
            if c == q {
                if q == UInt8(ascii: "'") && peek(1) == q {
                    out.append(q)
                    i += 2
                    continue
                }
                i += 1
                break
            }
            if c == 10 || c == 13 {
                // A line break inside quotes folds to a space (an empty line to a newline).
                while let last = out.last, Self.isSpace(last) { out.removeLast() }
                var breaks = 0
                while !atEnd && (Self.isBlank(peek()) && peek() != 0) {
                    if peek() == 10 { breaks += 1 }
                    advance()
                }
                out.append(contentsOf: breaks > 1 ? Array(repeating: 10, count: breaks - 1) : [32])
                continue
            }
            if q == UInt8(ascii: "\"") && c == UInt8(ascii: "\\") {
                try escape(into: &out)
                continue
            }
            out.append(c)
            i += 1
        }
        guard let s = String(validating: out, as: UTF8.self) else {
            throw error("a quoted value that is not valid UTF-8", at: start)
        }
        return s
    }

    mutating func escape(into out: inout [UInt8]) throws(YAMLError) {
        let m = mark
        i += 1
        let c = peek()
        i += 1
        func hex(_ n: Int) throws(YAMLError) -> UInt32 {
            var v: UInt32 = 0
            for _ in 0..<n {
                let d = peek()
                let x: UInt32
                switch d {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): x = UInt32(d - UInt8(ascii: "0"))
                case UInt8(ascii: "a")...UInt8(ascii: "f"): x = UInt32(d - UInt8(ascii: "a") + 10)
                case UInt8(ascii: "A")...UInt8(ascii: "F"): x = UInt32(d - UInt8(ascii: "A") + 10)
                default: throw error("a \\x, \\u or \\U escape needs \(n) hexadecimal digits", at: m)
                }
                v = v << 4 | x
                i += 1
            }
            return v
        }
        var scalar: UInt32
        switch c {
        case UInt8(ascii: "0"): scalar = 0
        case UInt8(ascii: "a"): scalar = 7
        case UInt8(ascii: "b"): scalar = 8
        case UInt8(ascii: "t"), 9: scalar = 9
        case UInt8(ascii: "n"): scalar = 10
        case UInt8(ascii: "v"): scalar = 11
        case UInt8(ascii: "f"): scalar = 12
        case UInt8(ascii: "r"): scalar = 13
        case UInt8(ascii: "e"): scalar = 27
        case UInt8(ascii: " "): scalar = 32
        case UInt8(ascii: "\""): scalar = 34
        case UInt8(ascii: "/"): scalar = 47
        case UInt8(ascii: "\\"): scalar = 92
        case UInt8(ascii: "N"): scalar = 0x85
        case UInt8(ascii: "_"): scalar = 0xA0
        case UInt8(ascii: "x"): scalar = try hex(2)
        case UInt8(ascii: "u"): scalar = try hex(4)
        case UInt8(ascii: "U"): scalar = try hex(8)
        case 10, 13:
            // An escaped line break: the value goes on without it (and without the indentation).
            i -= 1
            advance()
            while Self.isSpace(peek()) { i += 1 }
            return
        default:
            throw error("unknown escape '\\\(Character(UnicodeScalar(c)))' in a double-quoted value", at: m)
        }
        guard let u = Unicode.Scalar(scalar) else { throw error("an escape names no Unicode character", at: m) }
        out.append(contentsOf: Array(String(Character(u)).utf8))
    }

    /// `|` (literal) or `>` (folded), with optional chomping (`-`, `+`) and indentation digit.
    mutating func blockScalar(parent: Int) throws(YAMLError) -> String {
        let folded = peek() == UInt8(ascii: ">")
        i += 1
        var chomp: UInt8 = 0
        var explicit = 0
        for _ in 0..<2 {
            let c = peek()
            if c == UInt8(ascii: "-") || c == UInt8(ascii: "+") {
                chomp = c
                i += 1
            } else if c >= UInt8(ascii: "1") && c <= UInt8(ascii: "9") {
                explicit = Int(c - UInt8(ascii: "0"))
                i += 1
            }
        }
        skipInline()
        guard Self.isBreak(peek()) else { throw error("only a comment may follow a block scalar's indicator") }
        var lines: [String] = []
        var indent = explicit > 0 ? max(parent - 1, 0) + explicit : -1
        var pos = i  // at the break that ends the previous line
        var endPos = i  // the break (or end) after the last line that belongs to the scalar
        while pos < b.count {
            var next = pos
            if b[next] == 13 { next += 1 }
            guard next < b.count, b[next] == 10 else { break }
            next += 1
            var k = next
            while k < b.count && b[k] == 32 { k += 1 }
            if k >= b.count || Self.isBreak(b[k]) {
                lines.append("")
                pos = k
                continue
            }
            if indent < 0 {
                // The first line with text sets the indentation; it must be deeper than the parent's.
                if k - next < parent { break }
                indent = k - next
            }
            if k - next < indent { break }
            var e = next + indent
            while e < b.count && !Self.isBreak(b[e]) { e += 1 }
            lines.append(String(decoding: b[(next + indent)..<e], as: UTF8.self))
            pos = e
            endPos = e
        }
        while i < endPos { advance() }
        var trailing = 0
        while let last = lines.last, last.isEmpty {
            lines.removeLast()
            trailing += 1
        }
        var text: String
        if folded {
            text = ""
            var prevMoreIndented = false
            for (n, l) in lines.enumerated() {
                let more = l.first == " "
                if n > 0 {
                    if l.isEmpty || lines[n - 1].isEmpty || more || prevMoreIndented {
                        text += "\n"
                    } else {
                        text += " "
                    }
                }
                text += l
                prevMoreIndented = more
            }
        } else {
            text = lines.joined(separator: "\n")
        }
        if lines.isEmpty { return chomp == UInt8(ascii: "+") ? String(repeating: "\n", count: trailing) : "" }
        switch chomp {
        case UInt8(ascii: "-"): return text
        case UInt8(ascii: "+"): return text + String(repeating: "\n", count: trailing + 1)
        default: return text + "\n"
        }
    }

    /// `[ … ]` or `{ … }`, which may span lines.
    mutating func flowCollection() throws(YAMLError) -> YAMLNode {
        depth += 1
        defer { depth -= 1 }
        if depth > 200 { throw error("nested too deeply") }
        let start = mark
        let isMap = peek() == UInt8(ascii: "{")
        let close = isMap ? UInt8(ascii: "}") : UInt8(ascii: "]")
        i += 1
        var items: [YAMLNode] = []
        var pairs: [(key: YAMLNode, value: YAMLNode)] = []
        var seen: Set<String> = []
        while true {
            guard try skipToContent() != nil else {
                throw error("a '\(isMap ? "{" : "[")' that starts here is not closed", at: start)
            }
            if peek() == close {
                i += 1
                break
            }
            let entry = try flowNode()
            guard try skipToContent() != nil else {
                throw error("a '\(isMap ? "{" : "[")' that starts here is not closed", at: start)
            }
            if peek() == UInt8(ascii: ":") {
                i += 1
                let valueStart = mark
                guard try skipToContent() != nil else {
                    throw error("a '\(isMap ? "{" : "[")' that starts here is not closed", at: start)
                }
                let value: YAMLNode
                if peek() == UInt8(ascii: ",") || peek() == close {
                    value = .scalar(.init(string: "", plain: true), valueStart)
                } else {
                    value = try flowNode()
                }
                if isMap {
                    if let k = entry.string, !seen.insert(k).inserted {
                        throw error("duplicate key '\(k)' in the mapping that starts here", at: start)
                    }
                    pairs.append((entry, value))
                } else {
                    items.append(.mapping([(entry, value)], entry.mark))
                }
            } else if isMap {
                if let k = entry.string, !seen.insert(k).inserted {
                    throw error("duplicate key '\(k)' in the mapping that starts here", at: start)
                }
                pairs.append((entry, .scalar(.init(string: "", plain: true), mark)))
            } else {
                items.append(entry)
            }
            guard try skipToContent() != nil else {
                throw error("a '\(isMap ? "{" : "[")' that starts here is not closed", at: start)
            }
            if peek() == UInt8(ascii: ",") {
                i += 1
                continue
            }
            if peek() == close {
                i += 1
                break
            }
            throw error(
                "expected ',' or '\(Character(UnicodeScalar(close)))' in the collection that starts at line \(start.line), column \(start.column)"
            )
        }
        return isMap ? .mapping(pairs, start) : .sequence(items, start)
    }

    /// A plain value's text on this line, in flow context: up to ',', '[', ']', '{', '}', ': ',
    /// ' #' or the line break (trailing spaces left out; the position is after the last character).
    mutating func flowPlainLine() -> String {
        let s = i
        var end = i
        while !Self.isBreak(peek()) {
            let c = peek()
            if c == UInt8(ascii: ",") || c == UInt8(ascii: "[") || c == UInt8(ascii: "]")
                || c == UInt8(ascii: "{") || c == UInt8(ascii: "}")
            {
                break
            }
            if c == UInt8(ascii: ":")
                && (Self.isBlank(peek(1)) || peek(1) == UInt8(ascii: ",") || peek(1) == UInt8(ascii: "]")
                    || peek(1) == UInt8(ascii: "}"))
            {
                break
            }
            if Self.isSpace(c) && peek(1) == UInt8(ascii: "#") { break }
            i += 1
            if !Self.isSpace(c) { end = i }
        }
        i = end
        return String(decoding: b[s..<end], as: UTF8.self)
    }

    /// One entry inside a flow collection.
    mutating func flowNode() throws(YAMLError) -> YAMLNode {
        let start = mark
        var anchor: String?
        var verbatim = false
        while peek() == UInt8(ascii: "&") || peek() == UInt8(ascii: "!") {
            if peek() == UInt8(ascii: "&") { anchor = try name(after: "&") } else { verbatim = try tag() }
            _ = try skipToContent()
        }
        let node: YAMLNode
        switch peek() {
        case UInt8(ascii: "["), UInt8(ascii: "{"):
            node = try flowCollection()
        case UInt8(ascii: "\""), UInt8(ascii: "'"):
            node = .scalar(.init(string: try quoted(), plain: false), start)
        case UInt8(ascii: "*"):
            let n = try name(after: "*")
            guard let found = anchors[n] else {
                throw error("alias '*\(n)' names no anchor defined before it", at: start)
            }
            node = found
        case UInt8(ascii: ","), UInt8(ascii: "]"), UInt8(ascii: "}"):
            throw error("an empty entry in a collection (two commas, or a comma before the end?)")
        default:
            var text = flowPlainLine()
            if text.isEmpty { throw error("expected a value") }
            text += continuation(parent: 0, flow: true)
            node = .scalar(.init(string: text, plain: !verbatim), start)
        }
        if let anchor { anchors[anchor] = node }
        return node
    }
}
