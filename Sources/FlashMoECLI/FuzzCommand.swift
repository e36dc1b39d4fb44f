import ArgumentParser
import FlashMoE

/// `flashmoe fuzz`: random layers (every router, FFN, activation, precision, capacity, shared expert, E, k, H, I,
/// token counts leaning to the edges, ranks with and without empty ones) against the Float64 oracle with
/// `flashmoe verify`'s checks. Each case is a pure function of (seed, index); failures print the line that replays
/// them.
struct FuzzCommand: ReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "fuzz",
        abstract: "Random layers against the Float64 oracle (exits non-zero on any failure).",
        discussion: """
            Case I of seed S is a pure function of (S, I) and --fp8: `flashmoe fuzz --seed S --case I` (with --fp8 \
            when the run had it) replays it. Shapes come from a pool of \(FuzzShape.poolSize) per seed (the GPU \
            compiles one kernel per shape, in parallel, into the cubin cache); token counts, capacity, ties, rank \
            splits, weights and inputs are fresh per case, and each case's size is budgeted so the CPU oracle stays \
            fast. A failing case prints \
            `case I seed S: <layer>: <why>`; the last line is `fuzz: N passed, M failed`.

            --backend cpu checks the fast FP32 CPU path (shapes with ranks run as one rank there); --backend cuda the \
            fused GPU operator, and the shapes with ranks through DistributedMoE on one GPU. A kernel fault that loses \
            the CUDA context is reported with its case, and the run continues from the next case in a new process \
            (this binary again, --first-case), whose counts are added to the last line.
            """)

    /// The backend under test.
    enum Backend: String, CaseIterable, ExpressibleByArgument {
        /// CUDA when a GPU is usable, else the CPU.
        case auto
        /// The fast FP32 CPU path.
        case cpu
        /// The fused GPU operator (and DistributedMoE for shapes with ranks).
        case cuda
    }

    @Option(help: "Cases to run (indices 0..<N).")
    var cases = 200

    @Option(help: "The run seed: case I of seed S is always the same case.")
    var seed: UInt64 = 1

    @Option(help: "auto: CUDA when a GPU is usable, else the CPU.")
    var backend: Backend = .auto

    @Option(help: "Start no case after this many seconds from the start, kernel compilation included (the cases run so far are reported).")
    var maxSeconds: Double?

    @Option(name: .customLong("case"), help: "Run only case I (replays a failure).")
    var caseIndex: Int?

    @Option(help: "The GPU to run on.")
    var device = 0

    @Option(help: "Start at this case index (how a run continues in a new process after a kernel fault).")
    var firstCase = 0

    @Option(help: ArgumentHelp(
        "Only compile the kernels the selected cases need for these architectures with NVRTC (no GPU needed), "
            + "e.g. sm_90a or sm_80,sm_90a.", valueName: "archs"))
    var compileOnly: String?

    @Flag(help: ArgumentHelp(
        "Also draw fp8 layers (half of the shapes, with ranks or without; the other cases stay those of the seed without "
            + "it). "
            + "On the GPU it needs FLASHMOE_EXPERIMENTAL_FP8=1 (docs/fp8.md)."))
    var fp8 = false

    @Flag(help: "Print every case, not only the failures.")
    var verbose = false

    @Flag(help: "Run only the cheap cases among the selected ones (those the CPU test suite runs; see FuzzBudget.quick).")
    var quick = false

    /// What a run counted.
    struct Summary: Equatable {
        var passed = 0
        var failed = 0
        var notRun = 0
    }

    @discardableResult
    func execute(context: MachineContext, emit: (String) -> Void) throws -> Summary {
        let clock = ContinuousClock()
        let start = clock.now  // --max-seconds counts the kernel compilation too
        if fp8 && backend == .cuda && !FusedSpecialization.supportsFP8 {
            throw CLIError(.invalidValue, "--fp8 on the GPU needs FLASHMOE_EXPERIMENTAL_FP8=1: the kernel's fp8 path is "
                + "experimental (docs/fp8.md); run it with --backend cpu, or set the variable")
        }
        let indices = try selectedIndices()
        let all = indices.map { FuzzCase(seed: seed, index: $0, fp8: fp8) }
        let list = quick ? all.filter(\.isQuick) : all
        if let compileOnly {
            for arch in try GPUArchitecture.parseList(compileOnly) {
                try VerifyCommand.precompile(
                    FuzzTarget.kernels(of: list), arch: arch, storageRows: FuzzTarget.storageRowKernels(of: list))
            }
            return Summary()
        }
        let target = try FuzzTarget.make(backend, device: device, context: context, cases: list, emit: emit)
        emit("fuzz: \(list.count) case\(list.count == 1 ? "" : "s") of seed \(seed) on \(target.description)"
            + (quick ? " (--quick: \(all.count - list.count) larger cases left out)" : ""))

        var summary = Summary()
        for (n, c) in list.enumerated() {
            if let maxSeconds, (clock.now - start).milliseconds > maxSeconds * 1000 {
                summary.notRun = list.count - n
                emit("fuzz: stopped after \(formatSeconds(clock.now - start)) (--max-seconds \(maxSeconds)): "
                    + "\(n) of \(list.count) cases ran")
                break
            }
            var failure: String?
            var lost = false
            do {
                let caseStart = clock.now
                let outcome = try target.run(c)
                failure = outcome.failure
                if verbose && outcome.passed {
                    emit("case \(c.index) seed \(seed): \(c.summary): passed, rel.err \(VerifyTable.sci(outcome.relativeError)), "
                        + formatSeconds(clock.now - caseStart))
                }
            } catch {
                failure = "error: \(error)"
                lost = FuzzTarget.contextLost(error)
            }
            if let failure {
                summary.failed += 1
                emit("case \(c.index) seed \(seed): \(c.summary): \(failure)")
            } else {
                summary.passed += 1
            }
            if lost {
                let elapsed = (clock.now - start).milliseconds / 1000
                emit("fuzz: the CUDA context is lost after case \(c.index) (replay it with --seed \(seed) --case "
                    + "\(c.index)\(fp8 ? " --fp8" : "")); the later cases cannot run in this process")
                let remaining = list.count - n - 1
                let timeLeft = maxSeconds.map { $0 - elapsed }
                if caseIndex == nil, remaining > 0, (timeLeft ?? 1) > 0,
                    let counts = FuzzContinuation.run(arguments: continuation(after: c.index, seconds: timeLeft), emit: emit)
                {
                    summary.passed += counts.passed
                    summary.failed += counts.failed
                } else {
                    summary.notRun = remaining
                    if remaining > 0 { emit("fuzz: \(remaining) cases not run") }
                }
                break
            }
            if (n + 1) % 250 == 0 {
                Progress(logger: .commandLine(verbose: false)).logger.notice(
                    "fuzz: \(n + 1) of \(list.count) cases, \(summary.failed) failed, \(formatSeconds(clock.now - start))")
            }
        }
        let ran = summary.passed + summary.failed
        let elapsed = (clock.now - start).milliseconds / 1000
        emit("fuzz: \(ran) cases in \(formatDecimal(elapsed, 1)) s (\(formatDecimal(Double(ran) / max(elapsed, 1e-9), 1)) "
            + "cases/s)")
        emit("fuzz: \(summary.passed) passed, \(summary.failed) failed")
        if summary.failed > 0 { throw ExitCode.failure }
        return summary
    }

    /// The arguments of a process that continues this run from the case after `index`, within `seconds`.
    func continuation(after index: Int, seconds: Double?) -> [String] {
        var arguments = ["fuzz", "--cases", "\(cases)", "--seed", "\(seed)", "--backend", "cuda", "--device", "\(device)",
                         "--first-case", "\(index + 1)"]
        if let seconds { arguments += ["--max-seconds", "\(seconds)"] }
        if verbose { arguments.append("--verbose") }
        if quick { arguments.append("--quick") }
        if fp8 { arguments.append("--fp8") }
        return arguments
    }

    private func selectedIndices() throws(CLIError) -> [Int] {
        if let caseIndex {
            guard caseIndex >= 0 else { throw CLIError(.invalidValue, "--case must be 0 or more (got \(caseIndex))") }
            return [caseIndex]
        }
        guard cases >= 0 else { throw CLIError(.invalidValue, "--cases must be 0 or more (got \(cases))") }
        if let maxSeconds, !(maxSeconds > 0) {
            throw CLIError(.invalidValue, "--max-seconds must be positive (got \(maxSeconds))")
        }
        guard (0...max(cases, 0)).contains(firstCase) else {
            throw CLIError(.invalidValue, "--first-case must be between 0 and --cases (got \(firstCase))")
        }
        return Array(firstCase..<cases)
    }
}

/// Where the fuzz cases run: the fast CPU path, or the GPU operators on one device.
struct FuzzTarget {
    let description: String
    /// The backend for a layer, with storage rows or not (`FuzzShape.storageRows`).
    let makeOperator: (MoELayer, Bool) throws -> any MoEBackend
    let runRanks: ((RankVerificationCase) throws -> RankVerificationResult)?
    /// The GPU, held for the whole run: it retains the primary context, which would otherwise be torn down and
    /// created again (hundreds of milliseconds) between cases, when each case's operators are released.
    var gpu: CUDADevice? = nil

    func run(_ c: FuzzCase) throws -> FuzzOutcome {
        try c.run(makeOperator: { try makeOperator($0, c.shape.storageRows) }, runRanks: runRanks)
    }

    /// The target for `backend`; on CUDA, first compiles every kernel the cases need (in parallel, cached).
    static func make(
        _ backend: FuzzCommand.Backend, device: Int, context: MachineContext, cases: [FuzzCase], emit: (String) -> Void
    ) throws -> FuzzTarget {
        var useCUDA = backend == .cuda
        if backend == .auto {
            let status = context.gpu()
            useCUDA = status.unusableReason == nil && status.deviceNames.indices.contains(device)
            if !useCUDA { emit("fuzz: CUDA not usable (\(status.unusableReason ?? "no GPU \(device)")): the CPU backend") }
        }
        guard useCUDA else {
            return FuzzTarget(
                description: "the cpu backend (fast FP32; shapes with ranks run as one rank)",
                makeOperator: { try CPUBackend(layer: $0, mode: .fast, storageRows: $1) }, runRanks: nil)
        }
        let gpu = try CUDADevice(ordinal: device, driver: try CUDADriver.shared.get())
        try VerifyCommand.precompile(
            kernels(of: cases), arch: gpu.properties.architecture, storageRows: storageRowKernels(of: cases))
        var options = cudaOptions(deviceOrdinal: device)
        options.poisonOutput = true
        return FuzzTarget(
            description: "cuda (GPU \(device): \(gpu.properties.name); shapes with ranks through DistributedMoE)",
            makeOperator: { [options] layer, storageRows in
                var o = options
                o.storageReturns = storageRows
                return try FusedMoE(layer: layer, options: o)
            },
            runRanks: { try Verifier.runRanks($0, deviceOrdinal: device) }, gpu: gpu)
    }

    /// The (layer, ranks) of every kernel the cases launch: the single-GPU operator, and for a shape with ranks
    /// the ranks kernel too (`Verifier.runRanks` compares it with one rank).
    static func kernels(of cases: [FuzzCase]) -> [(MoEConfig, Int)] {
        cases.flatMap { c in [(c.config, 1)] + (c.shape.ranks.map { [(c.config, $0)] } ?? []) }
    }

    /// The (layer, ranks) of every kernel with storage rows the cases launch (`FuzzShape.storageRows`): the
    /// single-GPU one, and for a shape with ranks its ranks kernel with storage returns too (their one rank is the
    /// single-GPU one with storage rows).
    static func storageRowKernels(of cases: [FuzzCase]) -> [(MoEConfig, Int)] {
        kernels(of: cases.filter(\.shape.storageRows))
    }

    /// Whether `error` leaves the CUDA context unusable (a fault inside a kernel): later cases cannot run.
    static func contextLost(_ error: any Error) -> Bool {
        guard case .driver(_, _, let name, _, _)? = error as? CUDAError else { return false }
        return [
            "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_ILLEGAL_INSTRUCTION", "CUDA_ERROR_LAUNCH_FAILED",
            "CUDA_ERROR_MISALIGNED_ADDRESS", "CUDA_ERROR_INVALID_ADDRESS_SPACE", "CUDA_ERROR_INVALID_PC",
            "CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_ASSERT", "CUDA_ERROR_LAUNCH_TIMEOUT",
            "CUDA_ERROR_ECC_UNCORRECTABLE",
        ].contains(name)
    }
}
