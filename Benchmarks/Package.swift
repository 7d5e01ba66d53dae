// swift-tools-version:6.1
import PackageDescription

// The benchmark's own tools, kept apart from Ballast's package. `run.sh` builds them.
let package = Package(
    name: "BallastBenchmarks",
    targets: [
        // Load generator: new connections per second, and many idle connections held open.
        .executableTarget(name: "loadgen", swiftSettings: [.unsafeFlags(["-Ounchecked"])])
    ],
    swiftLanguageModes: [.v6]
)
