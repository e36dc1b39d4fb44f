/// One row of `flashmoe bench --json`: what was timed, on what, and how fast.
///
/// The JSON file is a list of these objects (`Benchmarks/compare.py` reads it). Keys, in this order:
/// `backend`, `preset`, `tokens`, `precision`, `median_ms`, `min_ms`, `tflops`, `gflops`, `floor_ms`,
/// `workspace_bytes`, `date`, `device`, `method`, `config`, `samples_ms`. Unknown values (`floor_ms` on the CPU,
/// `workspace_bytes` for a host backend, a rate when the median is 0) are `null`.
public struct BenchmarkRecord: Sendable, Hashable {
    /// The backend's name (`cpu`, `oracle`, `cuda`).
    public var backend: String
    /// The preset the layer's shape came from.
    public var preset: String
    /// Tokens S per forward pass.
    public var tokens: Int
    /// The precision's name (`fp32`, `tf32`, `bf16`, `fp16`).
    public var precision: String
    /// The median forward time in milliseconds.
    public var medianMilliseconds: Double
    /// The fastest forward time in milliseconds.
    public var minimumMilliseconds: Double
    /// Every timed forward pass in milliseconds, in run order (what the median and minimum summarise; its spread
    /// and drift tell a noisy machine from a slow kernel).
    public var samplesMilliseconds: [Double]
    /// The layer's FLOPs (`MoEConfig.flops(tokens:)`) per forward pass.
    public var flops: Double
    /// The roofline floor in milliseconds, when one is defined for the device.
    public var floorMilliseconds: Double?
    /// Device workspace in bytes, when the backend reports it.
    public var workspaceBytes: Int?
    /// When the measurement was taken (ISO 8601, UTC).
    public var date: String
    /// The CPU model or GPU name.
    public var device: String
    /// How the time was taken (`BenchmarkResult.method`).
    public var method: String
    /// The layer's shape in words (what the preset name stands for, overrides included).
    public var config: String
    /// Expert parallelism: the ranks R the tokens were split over (nil: the single-GPU operator).
    public var ranks: Int?
    /// Expert parallelism: the GPU of each kernel launch.
    public var rankDevices: [Int]?

    /// A record with `ranks` and `rankDevices` nil (set them for expert parallelism); no samples unless given.
    public init(
        backend: String, preset: String, tokens: Int, precision: String, medianMilliseconds: Double,
        minimumMilliseconds: Double, flops: Double, floorMilliseconds: Double?, workspaceBytes: Int?, date: String,
        device: String, method: String, config: String, samplesMilliseconds: [Double] = []
    ) {
        self.backend = backend
        self.preset = preset
        self.tokens = tokens
        self.precision = precision
        self.medianMilliseconds = medianMilliseconds
        self.minimumMilliseconds = minimumMilliseconds
        self.flops = flops
        self.floorMilliseconds = floorMilliseconds
        self.workspaceBytes = workspaceBytes
        self.date = date
        self.device = device
        self.method = method
        self.config = config
        self.samplesMilliseconds = samplesMilliseconds
    }

    /// FLOPs per second at the median time, in GFLOP/s; nil when the median is not positive.
    public var gflops: Double? {
        medianMilliseconds > 0 ? flops / (medianMilliseconds * 1e-3) / 1e9 : nil
    }

    /// The same rate in TFLOP/s.
    public var tflops: Double? { gflops.map { $0 / 1e3 } }

    /// The JSON text of a list of records (one object per line inside the brackets, newline-terminated).
    public static func json(_ records: [BenchmarkRecord]) -> String {
        "[\n" + records.map { "  " + $0.jsonValue.serialized }.joined(separator: ",\n") + "\n]\n"
    }

    private var jsonValue: JSONValue {
        var fields: [(String, JSONValue)] = [
            ("backend", .string(backend)),
            ("preset", .string(preset)),
            ("tokens", .int(tokens)),
            ("precision", .string(precision)),
            ("median_ms", .double(medianMilliseconds)),
            ("min_ms", .double(minimumMilliseconds)),
            ("tflops", tflops.map(JSONValue.double) ?? .null),
            ("gflops", gflops.map(JSONValue.double) ?? .null),
            ("floor_ms", floorMilliseconds.map(JSONValue.double) ?? .null),
            ("workspace_bytes", workspaceBytes.map(JSONValue.int) ?? .null),
            ("date", .string(date)),
            ("device", .string(device)),
            ("method", .string(method)),
            ("config", .string(config)),
            ("samples_ms", .array(samplesMilliseconds.map(JSONValue.double))),
        ]
        if let ranks {
            fields.append(("ranks", .int(ranks)))
            fields.append(("rank_devices", .array((rankDevices ?? []).map(JSONValue.int))))
        }
        return .object(fields)
    }
}
