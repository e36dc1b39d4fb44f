import CCUDA
import Testing

@testable import FlashMoE

/// `TensorMap` against the fake driver: what reaches `cuTensorMapEncodeTiled`, the argument checks and the error
/// mapping. No GPU needed (the descriptor's use by the sm_90a engine is checked by scripts/gpu-engine-test).
@Suite struct TensorMapTests {
    @Test(arguments: [(TensorMap.Element.bf16, 9 as UInt64), (.fp16, 6)])
    func encodesTheEngineLayout(element: TensorMap.Element, type: UInt64) throws {
        let fake = FakeDriver()
        let map = try TensorMap(
            driver: fake, element: element, address: 0x7000_0400, rows: 64 * 2048, columns: 2048, rowStride: 2048,
            boxRows: 256)
        // The fake writes back: address, dims (K innermost, then rows), row stride in bytes, box, type, swizzle.
        #expect(Array(map.words[0..<8]) == [0x7000_0400, 2048, 64 * 2048, 4096, 64, 256, type, 3])
        #expect(map.words.count == 16)
        #expect(element.boxColumns * element.byteSize == TensorMap.boxBytes)  // one box row = one swizzle span
    }

    /// The fp8 weight stacks: E4M3 codes as bytes (128 a box row), one matrix a box, the images' byte stride.
    @Test func encodesAStackOfE4M3Matrices() throws {
        let map = try TensorMap(
            driver: FakeDriver(), element: .e4m3, address: 0x7000_0000, rows: 1536, columns: 2048, rowStride: 2048,
            boxRows: 256, matrices: 128, matrixStride: 3_170_304)
        // address, K, rows, row stride (bytes), box columns, box rows, type (UINT8 = 0), swizzle, matrices, matrix
        // stride, box depth.
        #expect(Array(map.words[0..<11]) == [0x7000_0000, 2048, 1536, 2048, 128, 256, 0, 3, 128, 3_170_304, 1])
    }

    @Test(arguments: [(0, 4096, "matrices"), (2, 4104, "matrixStride"), (2, 4080, "matrixStride")])
    func rejectsAStackTMACannotDescribe(matrices: Int, stride: Int, names: String) {
        expectRefused(naming: names) { driver throws(CUDAError) in
            _ = try TensorMap(
                driver: driver, element: .e4m3, address: 0x1000, rows: 32, columns: 128, rowStride: 128, boxRows: 32,
                matrices: matrices, matrixStride: stride)
        }
    }

    @Test func aRowStrideLongerThanTheRowIsKept() throws {
        let map = try TensorMap(
            driver: FakeDriver(), element: .bf16, address: 0x1000, rows: 10, columns: 24, rowStride: 40, boxRows: 128)
        #expect(map.words[1] == 24 && map.words[3] == 80)
    }

    @Test(arguments: [
        (0x1008 as CUdeviceptr, 10, 64, 64, 128, "address"),
        (0x1000, 0, 64, 64, 128, "rows"),
        (0x1000, 10, 0, 64, 128, "columns"),
        (0x1000, 10, 64, 32, 128, "rowStride"),
        (0x1000, 10, 100, 100, 128, "multiple of 16 bytes"),
        (0x1000, 10, 64, 64, 0, "boxRows"),
        (0x1000, 10, 64, 64, 257, "boxRows"),
    ])
    func rejectsWhatTMACannotDescribe(
        address: CUdeviceptr, rows: Int, columns: Int, stride: Int, boxRows: Int, names: String
    ) {
        expectRefused(naming: names) { driver throws(CUDAError) in
            _ = try TensorMap(
                driver: driver, element: .bf16, address: address, rows: rows, columns: columns, rowStride: stride,
                boxRows: boxRows)
        }
    }

    /// `encode` fails with an invalid-argument error naming `names`, before the driver is asked.
    private func expectRefused(naming names: String, _ encode: (FakeDriver) throws(CUDAError) -> Void) {
        let fake = FakeDriver()
        do throws(CUDAError) {
            try encode(fake)
            Issue.record("expected an invalid-argument error")
        } catch {
            guard case .invalidArgument(let message) = error else {
                Issue.record("expected invalidArgument, got \(error)")
                return
            }
            #expect(message.contains(names))
        }
        #expect(!fake.calls.contains("tensorMapEncodeTiled"))  // checked before the driver is asked
    }

    @Test func aDriverFailureNamesTheCall() {
        let fake = FakeDriver()
        fake.fail("tensorMapEncodeTiled", with: CUDA_ERROR_NOT_SUPPORTED)
        do throws(CUDAError) {
            _ = try TensorMap(
                driver: fake, element: .bf16, address: 0x1000, rows: 128, columns: 64, rowStride: 64, boxRows: 128)
            Issue.record("encoding should fail")
        } catch {
            guard case .driver(let call, _, _, _, let hint) = error else {
                Issue.record("expected a driver error, got \(error)")
                return
            }
            #expect(call.hasPrefix("cuTensorMapEncodeTiled"))
            #expect(hint?.contains("sm_90") == true)
        }
    }
}
