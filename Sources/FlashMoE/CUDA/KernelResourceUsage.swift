/// What ptxas reported for one kernel (`--ptxas-options=-v`): registers, spills, stack, shared memory.
///
/// Fields ptxas did not print are 0 (it omits smem when there is none). A kernel that spills (`spillStoreBytes`
/// or `spillLoadBytes` > 0) touches local memory in its main loop: the fused kernel treats that as a defect.
public struct KernelResourceUsage: Sendable, Hashable {
    /// The kernel's name as ptxas prints it (the extern "C" name, or the mangled one).
    public var name: String
    /// The architecture it was compiled for, e.g. "sm_90a".
    public var arch: String
    /// Registers per thread.
    public var registers = 0
    /// Named barriers used.
    public var barriers = 0
    /// Stack frame bytes per thread.
    public var stackFrameBytes = 0
    /// Bytes stored to local memory for register spills, per thread.
    public var spillStoreBytes = 0
    /// Bytes loaded from local memory for register spills, per thread.
    public var spillLoadBytes = 0
    /// Static shared memory per block.
    public var sharedBytes = 0
    /// Constant bank 0 bytes (kernel parameters and driver constants).
    public var constantBytes = 0

    /// An entry for kernel `name` compiled for `arch`, with every count 0.
    public init(name: String, arch: String) {
        self.name = name
        self.arch = arch
    }

    /// Whether the kernel spills registers to local memory.
    public var spills: Bool { spillStoreBytes > 0 || spillLoadBytes > 0 }

    /// Every entry function in a ptxas verbose log, in the order ptxas compiled them. Lines about non-kernel
    /// (device) functions and anything not understood are ignored.
    ///
    /// The log has, per kernel:
    /// ```
    /// ptxas info    : Compiling entry function 'k' for 'sm_90a'
    /// ptxas info    : Function properties for k
    /// ptxas         .     8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    /// ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size, 1024 bytes smem
    /// ```
    public static func parse(ptxasLog log: String) -> [KernelResourceUsage] {
        var kernels: [KernelResourceUsage] = []
        var compiling: Int?  // the entry function whose "Used ..." line comes next
        var propertiesOf: String?  // the function whose "stack frame" line comes next
        for rawLine in log.split(whereSeparator: \.isNewline) {
            let line = String(rawLine)
            if let start = line.firstRange(of: "Compiling entry function '") {
                let rest = line[start.upperBound...]
                guard let nameEnd = rest.firstIndex(of: "'") else { continue }
                var usage = KernelResourceUsage(name: String(rest[..<nameEnd]), arch: "")
                if let forRange = rest.firstRange(of: "for '") {
                    usage.arch = String(rest[forRange.upperBound...].prefix(while: { $0 != "'" }))
                }
                kernels.append(usage)
                compiling = kernels.count - 1
            } else if let start = line.firstRange(of: "Function properties for ") {
                propertiesOf = line[start.upperBound...].trimmed()
            } else if line.contains("bytes stack frame") {
                guard let name = propertiesOf, let i = kernels.lastIndex(where: { $0.name == name }) else { continue }
                kernels[i].apply(fields: line)
                propertiesOf = nil
            } else if line.contains("Used "), line.contains(" registers"), let i = compiling {
                kernels[i].apply(fields: line)
                compiling = nil
            }
        }
        return kernels
    }

    /// Reads "N label" fields: "Used 40 registers", "used 1 barriers", "0 bytes spill stores", "1024 bytes smem".
    private mutating func apply(fields line: String) {
        let body = line.split(separator: ":", maxSplits: 1).last.map(String.init) ?? line
        for field in body.split(separator: ",") {
            let words = field.split(separator: " ").filter { $0 != "." }
            guard let numberIndex = words.firstIndex(where: { Int($0) != nil }), let value = Int(words[numberIndex])
            else { continue }
            switch words[(numberIndex + 1)...].joined(separator: " ") {
            case "registers": registers = value
            case "barriers": barriers = value
            case "bytes stack frame": stackFrameBytes = value
            case "bytes spill stores": spillStoreBytes = value
            case "bytes spill loads": spillLoadBytes = value
            case "bytes smem": sharedBytes = value
            case "bytes cmem[0]": constantBytes = value
            default: break
            }
        }
    }
}
