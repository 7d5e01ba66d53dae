// swift-tools-version:6.1
import PackageDescription

// The benchmark's own tools, kept apart from Ballast's package. `run.sh` builds them.
let package = Package(
    name: "BallastBenchmarks",
    dependencies: [.package(name: "Ballast", path: "..")],
    targets: [
        // Load generator: new connections per second, and many idle connections held open.
        .executableTarget(name: "loadgen", swiftSettings: [.unsafeFlags(["-Ounchecked"])]),
        // Counts malloc-family calls in the process it is linked into.
        .target(name: "CMallocCount"),
        // Micro benchmarks of the pure model: cost of one pick per policy, Maglev rebuilds.
        .executableTarget(
            name: "schedbench",
            dependencies: [.product(name: "BallastCore", package: "Ballast"), "CMallocCount"]),
    ],
    swiftLanguageModes: [.v6]
)
