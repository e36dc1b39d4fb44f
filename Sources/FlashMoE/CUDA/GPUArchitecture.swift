/// A GPU's compute capability, e.g. 9.0 for Hopper.
public struct ComputeCapability: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The major version, e.g. 9 for Hopper.
    public let major: Int
    /// The minor version, e.g. 6 for sm_86.
    public let minor: Int

    /// The compute capability `major.minor`.
    public init(major: Int, minor: Int) {
        self.major = major
        self.minor = minor
    }

    /// `major.minor`, e.g. "9.0".
    public var description: String { "\(major).\(minor)" }

    /// Orders by major version, then minor.
    public static func < (a: Self, b: Self) -> Bool { (a.major, a.minor) < (b.major, b.minor) }
}

/// An NVRTC compilation target, `sm_80` or `sm_90a`: what `--gpu-architecture` gets and what a cubin runs on.
///
/// Compute capability 9.0 and newer maps to the architecture-specific target (`sm_90a`, `sm_100a`, `sm_120a`),
/// because the features the fused kernel is built on (wgmma and setmaxnreg on Hopper, tcgen05 on Blackwell) exist
/// only there; the price is that such a cubin runs on exactly that compute capability, which JIT compilation per
/// device gives anyway. Older GPUs map to the plain target (`sm_80`, `sm_86`, `sm_89`).
public struct GPUArchitecture: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The compute capability the cubin runs on.
    public let computeCapability: ComputeCapability
    /// Whether this is the architecture-specific variant (the `a` suffix).
    public let architectureSpecific: Bool

    /// The target for a GPU of compute capability `cc`.
    public init(_ cc: ComputeCapability) {
        computeCapability = cc
        architectureSpecific = cc.major >= 9
    }

    /// The target for compute capability `major.minor`.
    public init(major: Int, minor: Int) {
        self.init(ComputeCapability(major: major, minor: minor))
    }

    /// Parses `sm_80`, `sm_90a`, `sm_100a` (the `sm_` prefix is optional).
    public init(parsing text: String) throws(CUDAError) {
        let bad = CUDAError.invalidArgument(
            "'\(text)' is not a GPU architecture: write it as NVRTC does, e.g. sm_80, sm_89, sm_90a, sm_100a")
        var rest = Substring(text.lowercased())
        if rest.hasPrefix("sm_") { rest = rest.dropFirst(3) }
        let specific = rest.hasSuffix("a")
        if specific { rest = rest.dropLast() }
        guard (2...3).contains(rest.count), rest.allSatisfy(\.isASCII), let number = Int(rest), number >= 10 else {
            throw bad
        }
        computeCapability = ComputeCapability(major: number / 10, minor: number % 10)
        architectureSpecific = specific
        if specific && computeCapability.major < 9 {
            throw .invalidArgument("'\(text)': only compute capability 9.0 and newer have an 'a' target (sm_90a)")
        }
    }

    /// NVRTC's number for it (80, 90, 100), as `nvrtcGetSupportedArchs` lists them.
    public var number: Int { computeCapability.major * 10 + computeCapability.minor }

    /// The name NVRTC takes: `sm_90a`.
    public var name: String { "sm_\(number)" + (architectureSpecific ? "a" : "") }

    /// The NVRTC name, e.g. `sm_90a` (the same as `name`).
    public var description: String { name }

    /// Orders by compute capability; the `a` variant sorts after the plain target of the same capability.
    public static func < (a: Self, b: Self) -> Bool {
        (a.computeCapability, a.architectureSpecific ? 1 : 0) < (b.computeCapability, b.architectureSpecific ? 1 : 0)
    }

    /// Parses a comma-separated list ("sm_80,sm_90a"), keeping order and dropping repeats.
    public static func parseList(_ text: String) throws(CUDAError) -> [GPUArchitecture] {
        var result: [GPUArchitecture] = []
        for part in text.split(separator: ",") {
            let arch = try GPUArchitecture(parsing: part.trimmed())
            if !result.contains(arch) { result.append(arch) }
        }
        guard !result.isEmpty else { throw .invalidArgument("no architecture given: e.g. --arch sm_80,sm_90a") }
        return result
    }
}

extension StringProtocol {
    /// This text without leading and trailing spaces (or other `character`s).
    func trimmed(_ character: Character = " ") -> String {
        String(drop(while: { $0 == character }).reversed().drop(while: { $0 == character }).reversed())
    }
}
