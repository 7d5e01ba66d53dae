// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "Ballast",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ballast", targets: ["ballast"]),
        // For Benchmarks/ (micro benchmarks of the pure model).
        .library(name: "BallastCore", targets: ["BallastCore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
    ],
    targets: [
        // GNU-only syscalls (epoll, eventfd, signalfd, splice, pipe2, accept4, F_SETPIPE_SZ) compiled with _GNU_SOURCE.
        .target(name: "CLinux"),
        // liburing (Debian liburing-dev), linked statically: the io_uring engine's ring.
        .target(name: "CRing", linkerSettings: [.linkedLibrary(":liburing.a")]),
        // Pure model: configuration, validation, schedulers, the immutable service table. No syscalls.
        .target(name: "BallastCore"),
        // Typed syscall layer.
        .target(name: "BallastIO", dependencies: ["BallastCore", "CLinux", "CRing"]),
        // Data plane: workers, listeners, the relay state machine, timer wheel.
        .target(
            name: "BallastProxy",
            dependencies: ["BallastCore", "BallastIO", "CLinux", .product(name: "Logging", package: "swift-log")]
        ),
        // libnftnl + libmnl (system libraries, via pkg-config) for nat mode.
        .systemLibrary(
            name: "CNftables", pkgConfig: "libnftnl libmnl",
            providers: [.apt(["libnftnl-dev", "libmnl-dev"])]
        ),
        // nat mode: nftables NAT rules and maps programmed over netlink in atomic batches.
        .target(
            name: "BallastNat",
            dependencies: [
                "BallastCore", "BallastIO", "CNftables", "CLinux", .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Active health checks on one event loop of their own.
        .target(
            name: "BallastHealth",
            dependencies: ["BallastCore", "BallastIO", "CLinux", .product(name: "Logging", package: "swift-log")]
        ),
        // Wiring: applies config, reload, lifecycle, logging; the runtime API and /metrics.
        .target(
            name: "BallastRuntime",
            dependencies: [
                "BallastCore", "BallastIO", "BallastProxy", "BallastHealth", "BallastNat", "CLinux",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "ballast",
            dependencies: ["BallastCore", "BallastRuntime"]
        ),
        // Yams only here: the configuration's YAML reader is checked against libyaml's.
        .testTarget(name: "BallastCoreTests", dependencies: ["BallastCore", .product(name: "Yams", package: "Yams")]),
        .testTarget(name: "BallastRuntimeTests", dependencies: ["BallastRuntime", "BallastCore"]),
        .testTarget(name: "BallastHealthTests", dependencies: ["BallastHealth", "BallastCore"]),
        .testTarget(name: "BallastIOTests", dependencies: ["BallastIO", "BallastCore", "CLinux"]),
        .testTarget(name: "BallastNatTests", dependencies: ["BallastNat", "BallastCore"]),
        .testTarget(
            name: "BallastProxyTests",
            dependencies: ["BallastProxy", "BallastIO", "BallastCore", .product(name: "Logging", package: "swift-log")]
        ),
        .testTarget(name: "IntegrationTests", dependencies: ["BallastIO", "BallastCore", "CLinux"]),
    ],
    swiftLanguageModes: [.v6]
)
