/// Where to look for NVRTC, in order. Pure: it builds the list from an environment and never touches the disk,
/// except through the `glob` function it is given.
///
/// 1. `FLASHMOE_NVRTC`: a library file, or a folder holding `libnvrtc.so.13` / `.12`. When it is set, it is the
///    only place searched: an explicit choice that does not load is an error, never silently replaced.
/// 2. `libnvrtc.so.13`, `libnvrtc.so.12` through the dynamic loader (LD_LIBRARY_PATH, ldconfig).
/// 3. `/usr/local/cuda/lib64`, then `/usr/local/cuda-*/lib64` (newest first).
/// 4. pip wheels (`nvidia/cu13/lib/libnvrtc.so.13` from nvidia-cuda-nvrtc 13, `nvidia/cuda_nvrtc/lib/libnvrtc.so.12`
///    from nvidia-cuda-nvrtc-cu12) under each `PYTHONPATH` entry, `$VIRTUAL_ENV`, `$CONDA_PREFIX`,
///    `~/.local`, `~/.pyenv/versions/*`, `/usr/local` and `/usr` site-packages.
public enum NVRTCLocator {
    /// The environment variable that overrides the search.
    public static let overrideVariable = "FLASHMOE_NVRTC"

    static let sonames = ["libnvrtc.so.13", "libnvrtc.so.12"]

    /// What to try, in order: bare sonames (for the loader) and file paths. A glob that matched nothing stays in
    /// the list unexpanded, so the report shows that place was looked at.
    /// `glob` expands patterns (default: the file system's); tests pass their own.
    public static func candidates(environment: [String: String], glob: ((String) -> [String])? = nil) -> [String] {
        let glob = glob ?? SystemFiles.glob
        if let explicit = environment[overrideVariable], !explicit.isEmpty {
            return explicitCandidates(explicit)
        }
        var patterns = sonames
        patterns += sonames.map { "/usr/local/cuda/lib64/\($0)" }
        patterns += sonames.map { "/usr/local/cuda-*/lib64/\($0)" }
        for site in siteDirectories(environment: environment) {
            patterns.append("\(site)/nvidia/cu13/lib/libnvrtc.so.13")
            patterns.append("\(site)/nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
        }
        return expand(patterns, glob: glob)
    }

    /// `patterns` with every glob expanded (newest first), each path once; a glob that matched nothing stays.
    static func expand(_ patterns: [String], glob: (String) -> [String]) -> [String] {
        var result: [String] = []
        for pattern in patterns {
            let expanded = pattern.contains("*") ? glob(pattern).sorted(by: >) : [pattern]
            for path in expanded.isEmpty ? [pattern] : expanded where !result.contains(path) {
                result.append(path)
            }
        }
        return result
    }

    /// The places `FLASHMOE_NVRTC` names: the file itself, or the sonames inside a folder.
    static func explicitCandidates(_ value: String) -> [String] {
        explicitCandidates(value, prefix: "libnvrtc", sonames: sonames)
    }

    /// The places an override names: the file itself (its name starts with `prefix`), or `sonames` in a folder.
    static func explicitCandidates(_ value: String, prefix: String, sonames: [String]) -> [String] {
        let path = value.hasSuffix("/") ? String(value.dropLast()) : value
        let last = path.split(separator: "/").last.map(String.init) ?? path
        if last.hasPrefix(prefix) && last.contains(".so") { return [path] }
        return sonames.map { "\(path)/\($0)" }
    }

    /// Python package folders (possibly glob patterns) to look under, most specific first.
    static func siteDirectories(environment: [String: String]) -> [String] {
        func value(_ key: String) -> String? { environment[key].flatMap { $0.isEmpty ? nil : $0 } }
        var sites: [String] = []
        if let pythonPath = value("PYTHONPATH") {
            sites += pythonPath.split(separator: ":").map(String.init).filter { $0.hasPrefix("/") }
        }
        for prefix in [value("VIRTUAL_ENV"), value("CONDA_PREFIX")].compactMap({ $0 }) {
            sites.append("\(prefix)/lib/python3*/site-packages")
        }
        if let home = value("HOME") {
            sites.append("\(home)/.local/lib/python3*/site-packages")
            sites.append("\(home)/.pyenv/versions/*/lib/python3*/site-packages")
        }
        for prefix in ["/usr/local/lib", "/usr/lib"] {
            sites.append("\(prefix)/python3*/site-packages")
            sites.append("\(prefix)/python3*/dist-packages")
        }
        sites.append("/usr/lib/python3/dist-packages")
        return sites
    }
}
