// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "FlashMoE",
    products: [
        .library(name: "FlashMoE", targets: ["FlashMoE"]),
        .executable(name: "flashmoe", targets: ["flashmoe"]),
        // The C ABI of include/flashmoe.h as a shared library (libFlashMoEC.so; scripts/build-lib builds it with the
        // Swift runtime linked in and copies it to lib/libflashmoe.so).
        .library(name: "FlashMoEC", type: .dynamic, targets: ["FlashMoEC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // Hand-written CUDA driver / NVRTC types and function-pointer typedefs: no cuda.h, no link flags.
        .target(name: "CCUDA"),
        // The CUDA C++ kernel sources, embedded into the binary with #embed.
        .target(name: "CKernels", exclude: ["kernels"]),
        // FP32 GEMM micro-kernels for the CPU backend (AVX-512 / AVX2+FMA chosen at run time, portable fallback).
        .target(name: "CGemm"),
        .target(
            name: "FlashMoE",
            dependencies: [
                "CCUDA", "CKernels", "CGemm",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // The CLI's commands, as a library so the tests can drive them in-process.
        .target(
            name: "FlashMoECLI",
            dependencies: [
                "FlashMoE",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // include/flashmoe.h as a Swift module, so the library reads the C structs with the C compiler's layout.
        .systemLibrary(name: "CFlashMoEABI", path: "Sources/CFlashMoEABI"),
        // The C ABI: @_cdecl functions over FlashMoE (CPU backend and the fused GPU operator).
        .target(
            name: "FlashMoEC",
            dependencies: ["FlashMoE", "CFlashMoEABI", "CCUDA"],
            exclude: ["flashmoe.map"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "flashmoe",
            dependencies: ["FlashMoECLI"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .testTarget(
            name: "FlashMoETests",
            dependencies: ["FlashMoE", "FlashMoECLI", "FlashMoEC"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)
