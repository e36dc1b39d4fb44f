import ArgumentParser
import FlashMoE

/// `flashmoe verify`: the fused GPU operator against the CPU oracle on fresh random inputs, output poisoned before
/// every launch: every preset at small token counts plus the edge cases (see `Verifier.standardCases`), then the
/// bounded-wait check (a test build that skips a publication must end in a typed error, not a hang).
struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check the GPU operator against the CPU oracle (exits non-zero on any failure).")

    @Option(help: "CUDA device ordinal.")
    var device = 0

    @Option(help: "Seed of the random weights and inputs (each case derives its own).")
    var seed: UInt64 = 1

    @Option(help: "Run only the cases whose name contains this text.")
    var filter: String?

    @Flag(help: "Skip the bounded-wait check with the fault-injection build.")
    var skipFaultCheck = false

    @Flag(help: "Skip the expert-parallel cases (ranks on one GPU).")
    var skipRanks = false

    @Flag(help: "Run only the expert-parallel cases.")
    var ranksOnly = false

    @Option(help: ArgumentHelp(
        "Only compile the kernels the selected cases need for these architectures with NVRTC (no GPU needed), "
            + "e.g. sm_90a; with --rank-devices, as if that many GPUs ran them.", valueName: "archs"))
    var compileOnly: String?

    @Option(help: ArgumentHelp(
        "Run the expert-parallel cases with one kernel launch on each of these GPUs (comma-separated ordinals, e.g. "
            + "0,1,2,3), adding every preset as that many ranks; cases with fewer ranks than GPUs are left out.",
        valueName: "ordinals"))
    var rankDevices: String?

    func run() throws {
        var cases = ranksOnly ? [] : Verifier.standardCases(seed: seed)
        // The fp8 ranks cases need the experimental fp8 path (docs/fp8.md), as the fp8 one-GPU cases do.
        var rankCases = skipRanks ? [] : Verifier.rankCases(seed: seed).filter {
            $0.config.precision != .fp8 || FusedSpecialization.supportsFP8
        }
        let gpus = try rankDevices.map(RankDevices.parse)
        if let gpus, !skipRanks {
            rankCases = rankCases.filter { $0.ranks >= gpus.count } + Verifier.presetRankCases(ranks: gpus.count, seed: seed)
        }
        if let filter {
            cases = cases.filter { $0.name.contains(filter) }
            rankCases = rankCases.filter { $0.name.contains(filter) }
        }
        // The kernels every case needs, compiled up front (and only these with --compile-only).
        let storageRows = ranksOnly ? [] : Verifier.storageRowsCases.map(\.config)
        // A ranks case launches its ranks kernel and the one rank it is compared with.
        func rankKernels(_ cs: [RankVerificationCase]) -> [(MoEConfig, Int)] {
            cs.flatMap { c in [(c.config, 1), (c.config, c.ranks)] }
        }
        func precompile(arch: GPUArchitecture, limit: Int?) throws {
            try Self.precompile(
                (cases.map(\.config) + (ranksOnly ? [] : Verifier.deviceForwardConfigs)
                    + (ranksOnly || !FusedSpecialization.supportsFP8 ? [] : [Verifier.fp8InTurnConfig]) + storageRows)
                    .map { ($0, 1) },
                arch: arch, sharedMemoryPerBlock: limit, storageRows: storageRows.map { ($0, 1) })
            try Self.precompile(
                rankKernels(rankCases), arch: arch, sharedMemoryPerBlock: limit,
                storageRows: rankKernels(rankCases.filter(\.storageReturns)))
        }
        if let compileOnly {
            for arch in try GPUArchitecture.parseList(compileOnly) { try precompile(arch: arch, limit: nil) }
            return
        }
        let gpu = try CUDADevice(ordinal: device, driver: try CUDADriver.shared.get())
        print("device \(device): \(gpu.properties.name), \(gpu.properties.multiprocessorCount) SMs, "
            + "\(gpu.properties.architecture)")
        try precompile(arch: gpu.properties.architecture, limit: gpu.properties.sharedMemoryPerBlockOptIn)

        print(VerifyTable.header)
        var failures = 0
        var deviceChecks = 0
        for c in cases {
            if c.config.precision == .fp8 && !FusedSpecialization.supportsFP8 {
                print("SKIP  " + VerifyTable.pad(c.name, 34)
                    + "fp8    the kernel's FP8 path is experimental: FLASHMOE_EXPERIMENTAL_FP8=1 runs it (docs/fp8.md)")
                continue
            }
            do {
                let r = try Verifier.run(c) { layer in
                    try FusedMoE(layer: layer, options: FusedOptions(deviceOrdinal: device, poisonOutput: true))
                }
                if !r.passed { failures += 1 }
                print(VerifyTable.row(r))
            } catch {
                failures += 1
                print(VerifyTable.errorRow(c, error))
            }
        }
        if !ranksOnly && (filter == nil || "device forward".contains(filter!)) {
            // The device-resident forward (caller buffers, a stream, queued launches, epoch wrap, fault + recovery),
            // storage rows, and the fp8 weight quantizer.
            let checks = Verifier.deviceForwardChecks(deviceOrdinal: device, seed: seed)
                + Verifier.storageRowsChecks(deviceOrdinal: device, seed: seed)
                + Verifier.fp8QuantizerChecks(deviceOrdinal: device, seed: seed)
            for c in checks {
                if !c.passed { failures += 1 }
                print((c.passed ? "PASS  " : "FAIL  ") + VerifyTable.pad(c.name, 52) + c.detail
                    + (c.failure.map { "  ← \($0)" } ?? ""))
            }
            deviceChecks = checks.count
        }
        if !rankCases.isEmpty {
            print("expert parallelism, ranks on one GPU: result, case, ranks R and launches L, tokens per rank, vs oracle, vs one rank, "
                + "repeats, bytes moved per rank (dispatch + return + signals)")
        }
        for c in rankCases {
            do {
                let r = try gpus.map { try Verifier.runRanks(c, devices: $0) } ?? Verifier.runRanks(c, deviceOrdinal: device)
                if !r.passed { failures += 1 }
                let moved = r.traffic.map { "\($0.totalBytes)" }.joined(separator: "/")
                print((r.passed ? "PASS  " : "FAIL  ") + VerifyTable.pad(c.name, 34) + "R=\(c.ranks) L=\(gpus?.count ?? c.launches) "
                    + "\(c.tokensPerRank) rel.err \(VerifyTable.sci(r.oracle.relativeError)) routing "
                    + "\(r.oracle.routingMismatches == 0 ? "same" : "\(r.oracle.routingMismatches) differ") drops "
                    + "\(r.oracle.droppedGPU)/\(r.oracle.droppedOracle), one rank: "
                    + "\(r.bitwiseEqualSingleRank ? "same bits" : "DIFFERENT"), repeats \(c.repeats): "
                    + "\(r.repeatsIdentical ? "same" : "DIFFERENT"), bytes \(moved)"
                    + (r.storageReturnError.map { ", vs FP32 returns \(VerifyTable.sci($0))" } ?? "")
                    + (r.failure.map { "  ← \($0)" } ?? ""))
            } catch {
                failures += 1
                print("FAIL  " + VerifyTable.pad(c.name, 30) + "error: \(error)")
            }
        }
        if !skipFaultCheck {
            if !ranksOnly {
                let (ok, line) = Self.faultCheck(device: device)
                if !ok { failures += 1 }
                print(line)
            }
            if !skipRanks {
                let (ok, line) = Self.rankFaultCheck(device: device, gpus: gpus)
                if !ok { failures += 1 }
                print(line)
            }
        }
        print(failures == 0 ? "all \(cases.count + rankCases.count + deviceChecks) cases passed" : "\(failures) FAILED")
        if failures > 0 { throw ExitCode.failure }
    }

    /// Compiles every specialisation the cases need, in parallel, into the cubin cache, so the cases only load.
    static func precompile(_ configs: [MoEConfig], arch: GPUArchitecture) throws {
        try precompile(configs.map { ($0, 1) }, arch: arch)
    }

    /// `sharedMemoryPerBlock`: the GPU's opt-in limit (nil: the architecture's, from `ArchitectureLimits`);
    /// `storageRows`: (layer, ranks) whose kernel with storage rows (`FusedOptions.storageReturns`: one GPU's rows,
    /// or the ranks' returns) is built too.
    static func precompile(
        _ configs: [(MoEConfig, Int)], arch: GPUArchitecture, sharedMemoryPerBlock: Int? = nil,
        storageRows: [(MoEConfig, Int)] = []
    ) throws {
        let environment = ProcessEnvironment.current()
        let compiler = KernelCompiler(backend: try NVRTC.shared.get(), environment: environment)
        let sources = KernelSources.current(environment: environment)
        // The target the operators will build for (FLASHMOE_EMULATE_ARCH included), so the cases find their cubins.
        let target = try FusedDeviceTarget(
            arch: arch, sharedMemoryPerBlock: try sharedMemoryPerBlock ?? ArchitectureLimits.of(arch).sharedMemoryPerBlockOptIn,
            emulating: environment[FusedDeviceTarget.emulateVariable])
        var unique: [KernelSpec] = []
        for (c, ranks) in configs {
            guard let spec = try? FusedSpecialization(
                config: c, arch: target.arch, sharedMemoryPerBlock: target.sharedMemoryPerBlock, ranks: ranks)
            else { continue }
            // An fp8 operator's prefill kernel too (FusedPrefillEngine).
            for s in spec.operatorBuilds(sharedMemoryPerBlock: target.sharedMemoryPerBlock)
            where !unique.contains(s.kernelSpec) {
                unique.append(s.kernelSpec)
            }
        }
        for (c, ranks) in storageRows {
            if let spec = try? FusedSpecialization(
                config: c, arch: target.arch, sharedMemoryPerBlock: target.sharedMemoryPerBlock, ranks: ranks,
                returnStorage: true
            ).kernelSpec, !unique.contains(spec) {
                unique.append(spec)
            }
        }
        let specs = unique
        let clock = ContinuousClock()
        let start = clock.now
        let results = compiler.compileAll(specs.map { ($0, target.arch) }, sources: sources)
        let failed = zip(specs, results).compactMap { spec, result -> String? in
            if case .failure(let error) = result { return "\(spec): \(error)" }
            return nil
        }
        print("compiled \(specs.count) kernel specialisations for \(target.arch) in "
            + "\(Int((clock.now - start).milliseconds)) ms (cached ones load instantly)")
        if let first = failed.first { throw CUDAError.invalidArgument("kernel compilation failed: \(first)") }
    }

    /// A build that never publishes GEMM1 row block 0 must end in a `FusedKernelError` naming the wait; then a
    /// normal operator on the same device must still run (the GPU was not left hanging).
    static func faultCheck(device: Int) -> (Bool, String) {
        do {
            let config = MoEConfig(hiddenSize: 64, intermediateSize: 64, experts: 4, topK: 2, precision: .bf16)
            let c = VerificationCase(name: "fault", config: config, tokens: 64, seed: 7)
            let (layer, x) = try Verifier.makeProblem(c)
            let faulty = try FusedMoE(
                layer: layer,
                options: FusedOptions(deviceOrdinal: device, waitBudget: .milliseconds(200), injectFault: true))
            let clock = ContinuousClock()
            let start = clock.now
            do {
                _ = try faulty.forward(x)
                return (false, "FAIL bounded wait: the fault-injection build finished without an error")
            } catch let error as FusedKernelError {
                let elapsed = (clock.now - start).milliseconds
                let healthy = try FusedMoE(layer: layer, options: FusedOptions(deviceOrdinal: device))
                _ = try healthy.forward(x)
                let ok = error.phase == .task
                return (ok, "\(ok ? "PASS" : "FAIL") bounded wait: typed error after \(Int(elapsed)) ms: \(error); "
                    + "a normal launch afterwards ran")
            }
        } catch {
            return (false, "FAIL bounded wait: \(error)")
        }
    }
}

extension VerifyCommand {
    /// Ranks: a build where the last rank stops flagging its rows for expert 0 in the second call must end in a
    /// `DistributedError` naming the waiting rank, the silent source, the expert and the epoch (2), with the first
    /// call's flag still in place (epoch 1, never cleared) not taken for the second's; once over one launch and once
    /// over two launches side by side (the per-GPU path), each followed by a good call on a normal operator.
    static func rankFaultCheck(device: Int, gpus: [Int]? = nil) -> (Bool, String) {
        var lines: [String] = []
        var allOK = true
        var plans = [[device], [device, device]]
        if let gpus, Set(gpus.prefix(2)).count == 2 { plans.append(Array(gpus.prefix(2))) }
        for devices in plans {
            let launches = devices.count
            let what = "rank hang safety (\(launches) launch\(launches == 1 ? "" : "es") on GPUs \(devices))"
            do {
                let config = MoEConfig(hiddenSize: 64, intermediateSize: 64, experts: 4, topK: 2, precision: .bf16)
                let c = VerificationCase(name: "rank fault", config: config, tokens: 64, seed: 8, forcedExpert: 0)
                let (layer, x) = try Verifier.makeProblem(c)
                let parts = [try x.slice(0..<32), try x.slice(32..<64)]
                let faulty = try DistributedMoE(
                    layer: layer, ranks: 2, devices: devices,
                    options: FusedOptions(deviceOrdinal: device, waitBudget: .milliseconds(200), injectFault: true))
                // The first call is good (the fault starts with epoch 2): its flags are still there, one epoch old.
                _ = try faulty.forward(parts)
                do {
                    _ = try faulty.forward(parts)
                    allOK = false
                    lines.append("FAIL \(what): the fault-injection build finished without an error")
                } catch let error as DistributedError {
                    // Then a normal operator on the same GPU must run: nothing was left hanging.
                    let good = try DistributedMoE(
                        layer: layer, ranks: 2, devices: devices, options: FusedOptions(deviceOrdinal: device))
                    _ = try good.forward(parts)
                    let ok = error.missingSource?.rank == 1 && error.missingSource?.expert == 0 && error.epoch == 2
                        && error.kernel.seen >> 32 == 1
                    allOK = allOK && ok
                    lines.append("\(ok ? "PASS" : "FAIL") \(what): typed error: \(error); a normal call ran after it")
                }
            } catch {
                allOK = false
                lines.append("FAIL \(what): \(error)")
            }
        }
        return (allOK, lines.joined(separator: "\n"))
    }
}

/// The table `flashmoe verify` prints.
enum VerifyTable {
    static let header =
        "result case                              prec  E    k  H     I      S     rel.err   tol      routing  dropped   "
        + "slots bits  gpu ms"

    static func row(_ r: VerificationResult) -> String {
        let c = r.verificationCase, cfg = c.config
        var line = (r.passed ? "PASS  " : "FAIL  ") + pad(c.name, 34) + pad(cfg.precision.rawValue, 6)
        line += pad("\(cfg.experts)", 5) + pad("\(cfg.topK)", 3) + pad("\(cfg.hiddenSize)", 6)
        line += pad("\(cfg.intermediateSize)", 7) + pad("\(c.tokens)", 6)
        line += pad(sci(r.relativeError), 10) + pad(sci(r.tolerance), 9)
        line += pad(r.routingMismatches == 0 ? "same" : "\(r.routingMismatches)(\(r.nearTies) ties)", 9)
        line += pad("\(r.droppedGPU)/\(r.droppedOracle)", 10) + pad(r.slotsIdentical ? "same" : "diff", 6)
        line += pad(r.bitwiseReproducible ? "same" : "diff", 6) + formatDecimal(r.gpuMilliseconds, 1)
        if let f = r.failure { line += "  ← \(f)" }
        return line
    }

    static func errorRow(_ c: VerificationCase, _ error: any Error) -> String {
        "FAIL  " + pad(c.name, 34) + pad(c.config.precision.rawValue, 6) + "error: \(error)"
    }

    static func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }

    static func sci(_ v: Double) -> String {
        guard v.isFinite else { return "\(v)" }
        guard v != 0 else { return "0" }
        let e = Int((log10(abs(v))).rounded(.down))
        let m = v / pow(10, Double(e))
        return "\(formatDecimal(m, 2))e\(e)"
    }

}

#if canImport(Glibc)
import Glibc
#endif
