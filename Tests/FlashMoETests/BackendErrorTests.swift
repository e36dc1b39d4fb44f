import Testing

@testable import FlashMoE

/// Bad shapes, configs and weights give typed `MoEError`s, never traps.
@Suite struct BackendErrorTests {
    static let config = Fixture.config(
        router: .softmax(renormalize: true), ffn: .plain, bias: false, activation: .relu, capacity: .dropless)

    static func kind(_ body: () throws -> Void) -> MoEError.Kind? {
        do {
            try body()
            return nil
        } catch let e as MoEError {
            return e.kind
        } catch {
            return nil
        }
    }

    @Test(arguments: CPUBackend.Mode.allCases)
    func badInputShapes(_ mode: CPUBackend.Mode) throws {
        let backend = try CPUBackend(layer: Fixture.layer(Self.config), mode: mode)
        #expect(Self.kind { _ = try backend.forward(HostTensor.zeros(shape: [3, 31])) } == .shapeMismatch)
        #expect(Self.kind { _ = try backend.forward(HostTensor.zeros(shape: [2, 3, 32])) } == .shapeMismatch)
        #expect(Self.kind { _ = try backend.forward(HostTensor.zeros(shape: [32])) } == .shapeMismatch)
        #expect(Self.kind { _ = try backend.forward(HostTensor.zeros(shape: [0, 5])) } == .shapeMismatch)
    }

    @Test func badConfigs() {
        var c = Self.config
        c.topK = 9  // k > E
        #expect(Self.kind { _ = try Fixture.layer(c) } == .invalidConfig)
        #expect(
            Self.kind { _ = try Router.route(logits: [Float](repeating: 0, count: 9 * 8), selectionBias: nil, config: c, tokens: 8) }
                == .invalidConfig)
        c = Self.config
        c.router = .deepSeek(groups: 3, groupsKept: 1, scalingFactor: 1)  // 3 does not divide 8
        #expect(Self.kind { _ = try Fixture.layer(c) } == .invalidConfig)
    }

    @Test func badRouterArguments() {
        let c = Self.config
        #expect(
            Self.kind { _ = try Router.route(logits: [Double](repeating: 0, count: 15), selectionBias: nil, config: c, tokens: 2) }
                == .shapeMismatch)
        #expect(
            Self.kind { _ = try Router.route(logits: [Float](repeating: 0, count: 16), selectionBias: [Float](repeating: 0, count: 8), config: c, tokens: 2) }
                == .unsupported)
        var s = c
        s.router = .deepSeek(groups: 2, groupsKept: 1, scalingFactor: 1)
        #expect(
            Self.kind { _ = try Router.route(logits: [Float](repeating: 0, count: 16), selectionBias: [0, 0], config: s, tokens: 2) }
                == .shapeMismatch)
        #expect(
            Self.kind {
                _ = try Router.route(
                    logits: [Float](repeating: 0, count: 16), selectionBias: [0, 0, .nan, 0, 0, 0, 0, 0], config: s,
                    tokens: 2)
            } == .invalidInput)
        #expect(Self.kind { _ = try Router.assignSlots(expertIDs: [0, 8], tokens: 1, config: c) } == .invalidInput)
        #expect(Self.kind { _ = try Router.assignSlots(expertIDs: [0], tokens: 1, config: c) } == .shapeMismatch)
        #expect(
            Self.kind { _ = try Router.logits(input: HostTensor.zeros(shape: [2, 4]), router: HostTensor.zeros(shape: [3, 5])) }
                == .shapeMismatch)
    }

    @Test func badSelectionBias() throws {
        var c = Self.config
        c.router = .deepSeek(groups: 2, groupsKept: 1, scalingFactor: 1)
        var w = try MoEWeights.random(config: c, seed: 1)
        w.selectionBias = try HostTensor(shape: [8], float32: [0, 0, 0, .infinity, 0, 0, 0, 0])
        let layer = try MoELayer(config: c, weights: w)
        for mode in CPUBackend.Mode.allCases {
            #expect(Self.kind { _ = try CPUBackend(layer: layer, mode: mode) } == .invalidInput)
        }
        // A softmax router with a selection bias is not defined.
        var soft = Self.config
        soft.router.selectionBias = true
        var ws = try MoEWeights.random(config: soft, seed: 1)
        ws.selectionBias = try HostTensor(shape: [8], float32: [Float](repeating: 0, count: 8))
        let softLayer = try MoELayer(config: soft, weights: ws)
        #expect(Self.kind { _ = try CPUBackend(layer: softLayer, mode: .fast) } == .unsupported)
    }

    /// NaN or infinite inputs are data, not errors: no trap, NaN tokens are unrouted.
    @Test(arguments: CPUBackend.Mode.allCases)
    func nonFiniteInputs(_ mode: CPUBackend.Mode) throws {
        let backend = try CPUBackend(layer: Fixture.layer(Self.config), mode: mode)
        var v = try Fixture.input(tokens: 3, hidden: 32).floats()
        v[0] = .nan
        v[40] = .infinity
        let out = try backend.forward(HostTensor(shape: [3, 32], float32: v))
        #expect(Array(out.routing.expertIDs[0..<2]) == [-1, -1])
        #expect(out.output.floats()[0..<32].allSatisfy { $0 == 0 })
        #expect(out.routing.expertIDs[4..<6].allSatisfy { $0 >= 0 })

        // No token routed at all: no expert runs.
        let none = try backend.forward(HostTensor(shape: [2, 32], float32: [Float](repeating: .nan, count: 64)))
        #expect(none.routing.expertIDs == [-1, -1, -1, -1] && none.routing.expertLoad.allSatisfy { $0 == 0 })
        #expect(none.output.floats().allSatisfy { $0 == 0 })
    }
}
