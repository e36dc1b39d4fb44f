import CCUDA
import Testing

@testable import FlashMoE

/// `FusedDeviceWeights(config:pointers:device:packRows:)` (weights from the caller's device memory, as the C ABI
/// passes them) against `FusedDeviceWeights(layer:device:packRows:)` (host weights) on the fake driver: every
/// buffer must hold the same bytes, for both layouts, every precision's storage, a partial last
/// packing block, biases, the selection bias and a gated shared expert.
/// The caller's device copies of weights in one ABI layout, kept alive for a test (here and DevicePointerFP8Tests).
struct CallerMemory {
    var buffers: [DeviceBuffer<UInt8>] = []
    let device: CUDADevice

    init(device: CUDADevice) { self.device = device }

    mutating func put(_ bytes: [UInt8]) throws -> UInt64 {
        let b = try DeviceBuffer<UInt8>(device: device, copying: bytes)
        buffers.append(b)
        return b.address
    }

    mutating func put(_ t: HostTensor) throws -> UInt64 { try put(Self.bytes(t)) }
    mutating func put(_ floats: [Float]) throws -> UInt64 { try put(floats.withUnsafeBytes { Array($0) }) }
    mutating func put(codes: [FP8E4M3]) throws -> UInt64 { try put(codes.map(\.bitPattern)) }

    static func bytes(_ t: HostTensor) -> [UInt8] { t.withUnsafeBytes { Array($0) } }

    /// [M, 2R, C] from two [M, R, C] stacks: each matrix's rows of `a`, then its rows of `b` (a fused gate_up).
    static func interleave<T>(_ a: [T], _ b: [T], matrices: Int) -> [T] {
        let per = a.count / matrices
        var out: [T] = []
        out.reserveCapacity(a.count + b.count)
        for m in 0..<matrices {
            let rows = m * per..<(m + 1) * per
            out += a[rows]
            out += b[rows]
        }
        return out
    }

    /// A fused gate_up of two tensors' bytes.
    static func fused(_ gate: HostTensor, _ up: HostTensor, matrices: Int) -> [UInt8] {
        interleave(bytes(gate), bytes(up), matrices: matrices)
    }
}

@Suite struct DevicePointerWeightsTests {
    /// Uploads `layer`'s weights (already in the storage type) in `fused` or separate layout.
    private func pointers(_ layer: MoELayer, fused: Bool, memory: inout CallerMemory) throws -> WeightPointers {
        let c = layer.config
        let w = layer.weights.converted(to: c.precision.storage)
        let gated = c.ffn == .gated
        func first(_ gate: HostTensor, _ up: HostTensor?, matrices: Int) throws -> WeightPointers.FirstLayer {
            if fused {
                guard let up else { return .fused(try memory.put(gate)) }
                return .fused(try memory.put(CallerMemory.fused(gate, up, matrices: matrices)))
            }
            return .separate(gate: try memory.put(gate), up: try up.map { try memory.put($0) })
        }
        return WeightPointers(
            router: try memory.put(w.router), selectionBias: try w.selectionBias.map { try memory.put($0) },
            firstLayer: try first(w.w1, gated ? w.w3 : nil, matrices: c.experts), down: try memory.put(w.w2),
            b1: try w.b1.map { try memory.put($0) }, b2: try w.b2.map { try memory.put($0) },
            sharedFirstLayer: try w.shared.map { try first($0.w1, gated ? $0.w3 : nil, matrices: 1) },
            sharedDown: try w.shared.map { try memory.put($0.w2) }, sharedGate: try w.shared?.gate.map { try memory.put($0) })
    }

    private func contents(_ w: FusedDeviceWeights) throws -> [[UInt8]?] {
        try [w.router, w.selectionBias, w.w1, w.w2, w.b1, w.b2, w.sharedW1, w.sharedW2].map { try $0?.download() }
    }

    static let configs: [(String, MoEConfig)] = [
        ("gated fp32, gated shared expert, partial block",
         MoEConfig(hiddenSize: 24, intermediateSize: 40, experts: 4, topK: 2, ffn: .gated, activation: .silu,
                   sharedExpert: SharedExpertConfig(intermediateSize: 20, gated: true), precision: .fp32)),
        ("gated bf16", MoEConfig(hiddenSize: 16, intermediateSize: 32, experts: 3, topK: 1, ffn: .gated, precision: .bf16)),
        ("gated fp16, shared expert", MoEConfig(hiddenSize: 16, intermediateSize: 24, experts: 2, topK: 2, ffn: .gated,
                                                sharedExpert: SharedExpertConfig(intermediateSize: 8), precision: .fp16)),
        ("gated tf32, gated shared expert",
         MoEConfig(hiddenSize: 16, intermediateSize: 24, experts: 3, topK: 2, ffn: .gated,
                   sharedExpert: SharedExpertConfig(intermediateSize: 8, gated: true), precision: .tf32)),
        ("plain tf32 with biases and a sigmoid router",
         MoEConfig(hiddenSize: 16, intermediateSize: 8, experts: 4, topK: 2, bias: true,
                   router: .deepSeek(groups: 2, groupsKept: 1, scalingFactor: 2), precision: .tf32)),
    ]

    @Test(arguments: 0..<configs.count, [true, false])
    func sameBytesAsFromHostWeights(_ index: Int, fused: Bool) throws {
        let (name, config) = Self.configs[index]
        let layer = try MoELayer(config: config, weights: .random(config: config, seed: UInt64(index + 7)))
        let fake = FakeDriver()
        let device = try CUDADevice(ordinal: 0, driver: fake)
        var memory = CallerMemory(device: device)
        let p = try pointers(layer, fused: fused, memory: &memory)
        let fromHost = try FusedDeviceWeights(layer: layer, device: device, packRows: 16)
        let fromDevice = try FusedDeviceWeights(config: config, pointers: p, device: device, packRows: 16)
        let (a, b) = (try contents(fromHost), try contents(fromDevice))
        for (field, (x, y)) in zip(["router", "selectionBias", "w1", "w2", "b1", "b2", "sharedW1", "sharedW2"], zip(a, b)) {
            #expect(x == y, "\(name), \(fused ? "fused" : "separate") layout: \(field) differs")
        }
        #expect(fromHost.byteCount == fromDevice.byteCount)
        // The caller's memory is not needed afterwards: freeing it leaves the built weights intact.
        memory.buffers.removeAll()
        #expect(try contents(fromDevice) == b)
    }

    @Test func aPointerThatIsNotDeviceMemoryIsNamed() throws {
        let config = Self.configs[0].1
        let layer = try MoELayer(config: config, weights: .random(config: config, seed: 1))
        let device = try CUDADevice(ordinal: 0, driver: FakeDriver())
        var memory = CallerMemory(device: device)
        for (field, bad) in [("down", 0x1234 as UInt64), ("up", 0x5678)] {
            var p = try pointers(layer, fused: false, memory: &memory)
            if field == "down" { p.down = bad }
            if field == "up", case .separate(let gate, _) = p.firstLayer { p.firstLayer = .separate(gate: gate, up: bad) }
            #expect {
                try FusedDeviceWeights(config: config, pointers: p, device: device, packRows: 16)
            } throws: { error in
                guard case CUDAError.invalidArgument(let message) = error else { return false }
                return message.hasPrefix("weights->\(field) (0x\(String(bad, radix: 16)))")
            }
        }
    }
}
