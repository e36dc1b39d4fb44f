/// Where to look for nvJitLink, in order (pure, like `NVRTCLocator`):
///
/// 1. `FLASHMOE_NVJITLINK`: a library file, or a folder holding `libnvJitLink.so.13` / `.12`; when set, the only
///    place searched.
/// 2. `libnvJitLink.so.13`, `libnvJitLink.so.12` through the dynamic loader.
/// 3. `/usr/local/cuda/lib64`, then `/usr/local/cuda-*/lib64` (newest first).
/// 4. pip wheels (`nvidia/cu13/lib/libnvJitLink.so.13` from nvidia-nvjitlink 13,
///    `nvidia/nvjitlink/lib/libnvJitLink.so.12` from nvidia-nvjitlink-cu12) under the Python site folders NVRTC is
///    searched in.
public enum NVJitLinkLocator {
    /// The environment variable that overrides the search.
    public static let overrideVariable = "FLASHMOE_NVJITLINK"

    static let sonames = ["libnvJitLink.so.13", "libnvJitLink.so.12"]

    /// What to try, in order (a glob that matched nothing stays, so the report shows the place was looked at).
    public static func candidates(environment: [String: String], glob: ((String) -> [String])? = nil) -> [String] {
        if let explicit = environment[overrideVariable], !explicit.isEmpty {
            return NVRTCLocator.explicitCandidates(explicit, prefix: "libnvJitLink", sonames: sonames)
        }
        var patterns = sonames
        patterns += sonames.map { "/usr/local/cuda/lib64/\($0)" }
        patterns += sonames.map { "/usr/local/cuda-*/lib64/\($0)" }
        for site in NVRTCLocator.siteDirectories(environment: environment) {
            patterns.append("\(site)/nvidia/cu13/lib/libnvJitLink.so.13")
            patterns.append("\(site)/nvidia/nvjitlink/lib/libnvJitLink.so.12")
        }
        return NVRTCLocator.expand(patterns, glob: glob ?? SystemFiles.glob)
    }
}
