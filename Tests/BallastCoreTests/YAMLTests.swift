import BallastCore
import Foundation
import Testing
import Yams

/// Ballast's own YAML reader (BallastCore/YAML.swift) against libyaml (through Yams, a test-only
/// dependency): the same trees for every config in the repository and for thousands of mutants
/// of a rich one; marks where the config's errors need them; clear errors for what it refuses.
@Suite struct YAMLTests {
    /// The content of a libyaml node in the reader's terms: scalars by text and null-ness.
    static func same(_ y: Yams.Node, _ n: YAMLNode) -> Bool { difference(y, n) == nil }

    /// Where two trees first differ (a path and both sides), or nil.
    static func difference(_ y: Yams.Node, _ n: YAMLNode, at path: String = "") -> String? {
        switch (y, n) {
        case (.scalar(let a), .scalar(let b, _)):
            // Null-ness: a plain empty, ~ or null (libyaml's explicit !!str is not told apart here).
            let yamlNull = a.style == .plain && ["", "~", "null", "Null", "NULL"].contains(a.string)
            if a.string == b.string && (yamlNull == b.isNull || !b.plain) { return nil }
            return
                "\(path): libyaml \(a.string.debugDescription) (null: \(yamlNull)), ours \(b.string.debugDescription) (null: \(b.isNull))"
        case (.sequence(let a), .sequence(let b, _)):
            if a.count != b.count { return "\(path): \(a.count) entries in libyaml, \(b.count) in ours" }
            for (k, (x, z)) in zip(a, b).enumerated() {
                if let d = difference(x, z, at: "\(path)[\(k)]") { return d }
            }
            return nil
        case (.mapping(let a), .mapping(let b, _)):
            if a.count != b.count {
                return
                    "\(path): keys \(a.map { $0.key.string ?? "?" }) in libyaml, \(b.map { $0.key.string ?? "?" }) in ours"
            }
            for (x, z) in zip(a, b) {
                if let d = difference(x.key, z.key, at: "\(path).key") { return d }
                if let d = difference(x.value, z.value, at: "\(path).\(x.key.string ?? "?")") { return d }
            }
            return nil
        default:
            return "\(path): different kinds of node"
        }
    }

    static func hasCollectionKey(_ y: Yams.Node) -> Bool {
        switch y {
        case .scalar, .alias: return false
        case .sequence(let s): return s.contains { hasCollectionKey($0) }
        case .mapping(let m):
            return m.contains { pair in
                if case .scalar = pair.key { return hasCollectionKey(pair.value) }
                return true
            }
        }
    }

    static func libyaml(_ text: String) -> Yams.Node?? {
        do { return .some(try Yams.compose(yaml: text)) } catch { return .none }
    }

    static func ours(_ text: String) -> Result<YAMLNode?, YAMLError> {
        do { return .success(try YAMLNode.parse(text)) } catch { return .failure(error) }
    }

    static var repoConfigs: [(String, String)] {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        var out: [(String, String)] = []
        let fm = FileManager.default
        for dir in ["examples", "docs", "dist", "."] {
            guard let e = fm.enumerator(atPath: root.appendingPathComponent(dir).path) else { continue }
            for case let f as String in e where f.hasSuffix(".yaml") || f.hasSuffix(".yml") || f.hasSuffix(".md") {
                if dir == "." && f.contains("/") { continue }
                guard
                    let text = try? String(
                        contentsOfFile: root.appendingPathComponent(dir + "/" + f).path, encoding: .utf8)
                else { continue }
                if f.hasSuffix(".md") {
                    // Each ```yaml block of the documentation.
                    var k = 0
                    for block in text.components(separatedBy: "```yaml\n").dropFirst() {
                        if let end = block.range(of: "```") {
                            out.append(("\(dir)/\(f) block \(k)", String(block[..<end.lowerBound])))
                            k += 1
                        }
                    }
                } else {
                    out.append(("\(dir)/\(f)", text))
                }
            }
        }
        return out
    }

    @Test("every YAML file and ```yaml block of the repository: the same tree as libyaml")
    func repositoryConfigs() throws {
        let configs = Self.repoConfigs
        #expect(configs.count >= 10, "\(configs.map(\.0))")
        for (name, text) in configs {
            guard case .some(let y) = Self.libyaml(text) else { continue }  // a deliberately bad example
            switch Self.ours(text) {
            case .success(let n):
                if let y, let n {
                    let d = Self.difference(y, n)
                    #expect(d == nil, "\(name): \(d ?? "")")
                } else {
                    #expect(y == nil && n == nil, "\(name)")
                }
            case .failure(let e):
                Issue.record("\(name): libyaml reads it, ours fails at \(e.line):\(e.column): \(e.message)")
            }
        }
    }

    @Test("3,000 mutants of a rich config: whatever libyaml reads, ours reads to the same tree")
    func mutantsAgree() throws {
        var rng = SystemRandomNumberGenerator()
        var agreed = 0
        var bothRefused = 0
        var onlyOursRefused: [String] = []
        var onlyLibyamlRefused = 0
        let end = Date().addingTimeInterval(20)
        for _ in 0..<3000 where Date() < end {
            let text = ConfigFuzzTests.mutate(ConfigFuzzTests.seed, &rng)
            // An anchor or alias glued to the next word takes it into its name (`&aname:` is an
            // anchor named "aname:"), where libyaml and the spec part ways; the features test
            // covers anchors.
            // Likewise a tag glued to a word: libyaml takes any tag, Ballast only the core ones.
            if text.contains("&a") || text.contains("*a") || text.contains("!!str") { continue }
            let y = Self.libyaml(text)
            let n = Self.ours(text)
            switch (y, n) {
            case (.some(let y), .success(let n)):
                if let y, let n {
                    let d = Self.difference(y, n)
                    #expect(d == nil, "\(d ?? "")\n\(text)")
                } else {
                    #expect(y == nil && n == nil)
                }
                agreed += 1
            case (.some(let y), .failure(let e)):
                // A collection as a key (`{a: 1}: b`) is YAML; a config has no use for it.
                if let y, Self.hasCollectionKey(y) { continue }
                onlyOursRefused.append("\(e.line):\(e.column) \(e.message)\n\(text)")
            case (.none, .failure):
                bothRefused += 1
            case (.none, .success):
                onlyLibyamlRefused += 1
            }
        }
        print(
            "yaml differential: \(agreed) same trees, \(bothRefused) refused by both, \(onlyLibyamlRefused) refused by libyaml only, \(onlyOursRefused.count) by ours only"
        )
        #expect(onlyOursRefused.isEmpty, "\(onlyOursRefused.prefix(3).joined(separator: "\n---\n"))")
        #expect(agreed > 100 && bothRefused > 100)
    }

    @Test("marks, block scalars, anchors, quoting, and errors with line and column")
    func features() throws {
        let text = """
            # comment
            a: 1   # trailing
            b:
              - x
              - { k: "v:1", 'q': 'it''s' }
              -
                c: &anchor [1, 2,
                  3]
            d: *anchor
            e: |
              line one
                indented
            f: >-
              folded
              text
            g: "tab\\tnew\\nline \\u00e9"
            h:
            i: ~
            """
        guard case .mapping(let m, let mark)? = try YAMLNode.parse(text) else {
            Issue.record("not a mapping")
            return
        }
        #expect(mark == YAMLNode.Mark(line: 2, column: 1))
        #expect(m.map { $0.key.string ?? "" } == ["a", "b", "c", "d", "e", "f", "g", "h", "i"].filter { $0 != "c" })
        #expect(m[0].value.mark == YAMLNode.Mark(line: 2, column: 4))
        guard case .sequence(let seq, _) = m[1].value else { return #expect(Bool(false)) }
        #expect(seq[0].string == "x")
        guard case .mapping(let flow, let fm) = seq[1] else { return #expect(Bool(false)) }
        #expect(fm == YAMLNode.Mark(line: 5, column: 5))
        #expect(flow[0].value.string == "v:1" && flow[1].value.string == "it's")
        #expect(flow[1].key.mark == YAMLNode.Mark(line: 5, column: 17))
        #expect(m[2].value == seq[2].mappingValue("c"))
        #expect(m[3].value.string == "line one\n  indented\n")
        #expect(m[4].value.string == "folded text")
        #expect(m[5].value.string == "tab\tnew\nline é")
        if case .scalar(let s, _) = m[6].value { #expect(s.isNull) } else { #expect(Bool(false)) }
        if case .scalar(let s, _) = m[7].value { #expect(s.isNull) } else { #expect(Bool(false)) }

        let bad: [(String, Int, Int, String)] = [
            ("a: [1, 2\nb: 3\n", 1, 4, "not closed"),
            ("a: [1, 2 b]]\n", 1, 12, "unexpected text"),
            ("a: 1\n  b: 2\n", 2, 4, "quote the value"),
            ("a:\n    b: 1\n  c: 2\n", 3, 3, "indentation"),
            ("a:\n\t- 1\n", 2, 1, "tab"),
            ("a: b: c\n", 1, 5, "quote the value"),
            ("a: \"open\n", 1, 4, "not closed"),
            ("a: *nope\n", 1, 4, "no anchor"),
            ("a: 1\na: 2\n", 1, 1, "duplicate key 'a'"),
            ("a: !custom x\n", 1, 4, "tag"),
            ("- a\nb: 1\n", 2, 1, "unexpected content"),
        ]
        for (text, line, column, words) in bad {
            do {
                _ = try YAMLNode.parse(text)
                Issue.record("accepted: \(text)")
            } catch {
                #expect(error.line == line && error.column == column, "\(text): \(error)")
                #expect(error.message.contains(words), "\(text): \(error.message)")
            }
        }
    }
}

extension YAMLNode {
    fileprivate func mappingValue(_ key: String) -> YAMLNode? {
        guard case .mapping(let pairs, _) = self else { return nil }
        return pairs.first { $0.key.string == key }?.value
    }
}
