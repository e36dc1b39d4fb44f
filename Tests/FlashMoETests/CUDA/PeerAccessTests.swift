import CCUDA
import Testing

@testable import FlashMoE

/// `PeerAccess.connect` and `CUDADevice.peerLink` against the fake driver's peer matrix: which pairs are checked,
/// which errors name which GPUs, and that access is enabled both ways only once every link passed.
@Suite struct PeerAccessTests {
    typealias Pair = FakeDriver.PeerPair

    /// Opens GPUs `ordinals` of `fake`.
    private func open(_ ordinals: [Int], _ fake: FakeDriver) throws -> [CUDADevice] {
        try ordinals.map { try CUDADevice(ordinal: $0, driver: fake) }
    }

    @Test func allConnectedEnablesAccessBothWaysForEachDistinctPair() throws {
        let fake = FakeDriver(devices: 3)
        let links = try PeerAccess.connect(open([0, 1, 2], fake))
        let expected = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
        #expect(fake.enabledPeers == expected.map { Pair(source: CUdevice($0.0), destination: CUdevice($0.1)) })
        #expect(links.map { [$0.source, $0.destination] } == expected.map { [$0.0, $0.1] })
        #expect(links.allSatisfy { $0.access && $0.nativeAtomics })

        // Connecting again is harmless: the driver's "already enabled" is success, and nothing new is enabled.
        try PeerAccess.connect(open([2, 0], fake))
        #expect(fake.enabledPeers.count == 6)
    }

    @Test func pairsFollowTheListedOrder() throws {
        let fake = FakeDriver(devices: 3)
        try PeerAccess.connect(open([2, 0], fake))
        #expect(fake.enabledPeers == [Pair(source: 2, destination: 0), Pair(source: 0, destination: 2)])
    }

    @Test func aPairWithoutAccessThrowsNoAccessNamingBothGPUs() throws {
        let fake = FakeDriver(devices: 3)
        fake.setPeer(2, 1, access: false, nativeAtomics: false)
        #expect(throws: PeerAccessError(source: 2, destination: 1, reason: .noAccess)) {
            try PeerAccess.connect(open([0, 1, 2], fake))
        }
        #expect(fake.enabledPeers.isEmpty, "every link is checked before any access is enabled")
        let text = PeerAccessError(source: 2, destination: 1, reason: .noAccess).description
        #expect(text.hasPrefix("GPU 2 cannot access GPU 1's memory directly"))
        #expect(text.contains("nvidia-smi topo -m") && text.contains("all ranks on one GPU"))
    }

    @Test func accessWithoutNativeAtomicsThrowsNoNativeAtomics() throws {
        let fake = FakeDriver(devices: 3)
        fake.setPeer(1, 0, access: true, nativeAtomics: false)
        fake.setPeer(2, 1, access: false, nativeAtomics: false)  // also broken, but checked after 1 → 0
        #expect(throws: PeerAccessError(source: 1, destination: 0, reason: .noNativeAtomics)) {
            try PeerAccess.connect(open([0, 1, 2], fake))
        }
        #expect(fake.enabledPeers.isEmpty)
        let text = PeerAccessError(source: 1, destination: 0, reason: .noNativeAtomics).description
        #expect(text.hasPrefix("GPU 1 can access GPU 0's memory, but not with native atomics"))
        #expect(text.contains("NVLink") && text.contains("all ranks on one GPU"))
    }

    @Test func oneGPUListedTwiceEnablesNothing() throws {
        let fake = FakeDriver(devices: 2)
        let first = try CUDADevice(ordinal: 1, driver: fake)
        let second = try CUDADevice(ordinal: 1, driver: fake)  // another object, the same GPU
        #expect(try PeerAccess.connect([first, first, second]).isEmpty)
        #expect(try PeerAccess.connect([first]).isEmpty)
        #expect(try PeerAccess.connect([]).isEmpty)
        #expect(fake.enabledPeers.isEmpty)

        // Repeats do not multiply the pairs of distinct GPUs either.
        let zero = try CUDADevice(ordinal: 0, driver: fake)
        #expect(try PeerAccess.connect([first, zero, second, zero]).count == 2)
        #expect(fake.enabledPeers == [Pair(source: 1, destination: 0), Pair(source: 0, destination: 1)])
    }

    @Test func driverFailuresSurfaceAsCUDAError() throws {
        let fake = FakeDriver(devices: 2)
        let devices = try open([0, 1], fake)
        fake.fail("deviceGetP2PAttribute", with: CUDA_ERROR_UNKNOWN)
        #expect {
            try PeerAccess.connect(devices)
        } throws: { error in
            driverCall(error) == "cuDeviceGetP2PAttribute(NATIVE_ATOMIC_SUPPORTED, 0 → 1)"
        }

        let other = FakeDriver(devices: 2)
        let pair = try open([0, 1], other)
        other.fail("contextEnablePeerAccess", with: CUDA_ERROR_UNKNOWN)
        #expect { try PeerAccess.connect(pair) } throws: { driverCall($0) == "cuCtxEnablePeerAccess(0 → 1)" }
    }

    /// The call a `CUDAError.driver` names; nil for any other error.
    private func driverCall(_ error: any Error) -> String? {
        guard case .driver(let call, _, _, _, _) = error as? CUDAError else { return nil }
        return call
    }

    @Test func peerLinkReportsEachDirection() throws {
        let fake = FakeDriver(devices: 2)
        fake.setPeer(0, 1, access: true, nativeAtomics: true, performanceRank: 3)
        fake.setPeer(1, 0, access: true, nativeAtomics: false, performanceRank: 5)
        let (zero, one) = try (CUDADevice(ordinal: 0, driver: fake), CUDADevice(ordinal: 1, driver: fake))
        #expect(
            try zero.peerLink(to: one)
                == PeerLink(source: 0, destination: 1, access: true, nativeAtomics: true, performanceRank: 3))
        #expect(
            try one.peerLink(to: zero)
                == PeerLink(source: 1, destination: 0, access: true, nativeAtomics: false, performanceRank: 5))
        #expect(throws: CUDAError.self) { _ = try zero.peerLink(to: zero) }
    }
}
