import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The release binary (`make release`: `--static-swift-stdlib`) runs where no Swift runtime is
/// installed: here, in a private mount namespace with the toolchain's directory hidden under an
/// empty tmpfs.
@Suite struct StaticBuildTests {
    static let binary = Repo.root.appendingPathComponent(".build-static/release/ballast").path
    static let toolchain = "/opt/swift"
    static var ready: Bool {
        geteuid() == 0 && FileManager.default.isExecutableFile(atPath: binary)
            && FileManager.default.fileExists(atPath: toolchain)
            && FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare")
    }

    @Test(
        "the static binary needs no Swift libraries",
        .enabled(if: ready, "needs root, /usr/bin/unshare and `make release` first (scripts/test.sh builds it)"))
    func runsWithoutToolchain() throws {
        let (ls, lddOut, _) = try runCommand("/usr/bin/ldd", [Self.binary])
        #expect(ls == 0)
        #expect(!lddOut.contains("libswift"), "\(lddOut)")
        #expect(!lddOut.contains("libFoundation"), "\(lddOut)")
        let dir = TempDir()
        let config = dir.write("b.yaml", configYAML(services: [serviceYAML(servers: [("e", 7001)])]))
        let script =
            "mount -t tmpfs none \(Self.toolchain) && test -z \"$(ls -A \(Self.toolchain))\" && \(Self.binary) --version && \(Self.binary) check -c \(config)"
        let (status, out, err) = try runCommand("/usr/bin/unshare", ["-m", "/bin/sh", "-c", script])
        #expect(status == 0, "\(err)")
        #expect(out.hasPrefix("ballast 0.1.0 (release build, "))
        #expect(out.hasSuffix("Configuration file is valid\n"))
    }
}
