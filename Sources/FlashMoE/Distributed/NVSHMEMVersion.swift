/// An NVSHMEM release (`nvshmemx_vendor_get_version_info`), e.g. 3.4.5.
public struct NVSHMEMVersion: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The release's major number (3 in 3.4.5).
    public let major: Int
    /// The release's minor number (4 in 3.4.5).
    public let minor: Int
    /// The release's patch number (5 in 3.4.5).
    public let patch: Int

    /// The release major.minor.patch.
    public init(major: Int, minor: Int, patch: Int) { (self.major, self.minor, self.patch) = (major, minor, patch) }

    /// Release order: major, then minor, then patch.
    public static func < (a: Self, b: Self) -> Bool { (a.major, a.minor, a.patch) < (b.major, b.minor, b.patch) }
    /// `major.minor.patch`, e.g. "3.4.5".
    public var description: String { "\(major).\(minor).\(patch)" }
}

/// The layout generation of `nvshmemx_init_attr_t` a release's headers define: v1 (3.4: `nvshmemx_init_args_v1`,
/// padding after the unique-id arguments) or v2 (3.8: `cuda_device_id` at byte 48). Both are 144 bytes with the
/// same offsets up to byte 48; the version words say which one the library reads.
public enum NVSHMEMInitAttrLayout: Int, Sendable {
    case v1 = 1
    case v2 = 2
}

/// The NVSHMEM releases whose host-struct layouts `NVSHMEMLibrary` was checked against, and the refusal of others.
///
/// Checked by reading each wheel's headers (`device_host/nvshmem_types.h`, `bootstrap_device_host/
/// nvshmem_uniqueid.h`, `host/nvshmemx_api.h`): `nvshmemx_uniqueid_v1` (128 bytes, version word first),
/// `nvshmemx_uniqueid_args_v1` (24 bytes: version, id pointer, myrank, nranks), `NVSHMEMX_INIT_WITH_UNIQUEID`
/// (1 << 3) and the entry points' signatures are the same in 3.4 and 3.8; the init attributes differ only in the
/// version words and 3.8's `cuda_device_id` (`NVSHMEMInitAttrLayout`). Other minor releases may have moved them.
public enum NVSHMEMVersionCheck {
    /// The (major, minor) releases checked, any patch, with their init-attribute layout.
    public static let checkedVersions: [(major: Int, minor: Int, layout: NVSHMEMInitAttrLayout)] = [
        (3, 4, .v1), (3, 8, .v2),
    ]

    /// Set to 1 to load a release not in `checkedVersions` anyway (its layouts taken as 3.8's).
    public static let overrideVariable = "FLASHMOE_NVSHMEM_ANY_VERSION"

    /// The init-attribute layout of `version`, or nil for a release not checked.
    public static func layout(of version: NVSHMEMVersion) -> NVSHMEMInitAttrLayout? {
        checkedVersions.first { $0.major == version.major && $0.minor == version.minor }?.layout
    }

    /// - Throws: `CUDAError.invalidArgument` naming the release, the checked ones and what to install, unless
    ///   `version` is checked or `FLASHMOE_NVSHMEM_ANY_VERSION=1` is set.
    public static func check(
        _ version: NVSHMEMVersion, path: String, environment: [String: String] = ProcessEnvironment.current()
    ) throws(CUDAError) {
        guard layout(of: version) == nil, environment[overrideVariable] != "1" else { return }
        let checked = checkedVersions.map { "\($0.major).\($0.minor).x" }.joined(separator: ", ")
        throw .invalidArgument(
            "NVSHMEM \(version) at \(path) is not a release whose host structs FlashMoE was checked against "
                + "(\(checked)): pip install nvidia-nvshmem-cu13==3.8.0 (or 3.4.*), point \(NVSHMEMLibrary.overrideVariable) "
                + "at one, or set \(overrideVariable)=1 to try it with 3.8's layouts")
    }
}
