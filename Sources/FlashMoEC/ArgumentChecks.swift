import CFlashMoEABI
import FlashMoE

/// The argument checks every entry point runs before it reads or writes through a caller's pointer.
enum Check {
    /// `pointer`, or an error naming `name` when it is NULL or not aligned to `T`'s alignment.
    static func pointer<T>(_ pointer: UnsafePointer<T>?, _ name: String) throws(ArgumentError) -> UnsafePointer<T> {
        guard let pointer else { throw ArgumentError("\(name) is NULL: pass a valid pointer") }
        try aligned(UInt(bitPattern: pointer), name, MemoryLayout<T>.alignment)
        return pointer
    }

    /// As `pointer(_:_:)` for a pointer the library writes through.
    static func output<T>(_ pointer: UnsafeMutablePointer<T>?, _ name: String) throws(ArgumentError)
        -> UnsafeMutablePointer<T>
    {
        UnsafeMutablePointer(mutating: try Self.pointer(UnsafePointer(pointer), name))
    }

    /// Throws unless `address` is a multiple of `alignment`.
    static func aligned(_ address: UInt, _ name: String, _ alignment: Int, _ what: String = "") throws(ArgumentError) {
        guard alignment > 1, address % UInt(alignment) != 0 else { return }
        let of = what.isEmpty ? "" : " (\(what))"
        throw ArgumentError(
            "\(name) (0x\(String(address, radix: 16))) is misaligned: it must be a multiple of \(alignment) bytes\(of)")
    }

    /// The address of a forward's per-token array `name` (`what` describes it): with `tokens` > 0 it must be
    /// non-NULL and aligned to `alignment`; with none it may be anything (nothing is read or written).
    static func rows(_ p: UnsafeRawPointer?, _ name: String, tokens: Int64, alignment: Int, _ what: String)
        throws(ArgumentError) -> UInt64
    {
        guard tokens > 0 else { return UInt64(UInt(bitPattern: p)) }
        guard let p else { throw ArgumentError("\(name) is NULL: pass \(what) (tokens = \(tokens))") }
        try aligned(UInt(bitPattern: p), name, alignment, what)
        return UInt64(UInt(bitPattern: p))
    }

    /// An output struct whose first field, `size`, the caller set to `sizeof(type)`: checked like `output`, then
    /// its size against this library's struct `T` (`type` names it in the message).
    static func sizedOutput<T>(_ pointer: UnsafeMutablePointer<T>?, _ name: String, type: String) throws(ArgumentError)
        -> UnsafeMutablePointer<T>
    {
        let out = try output(pointer, name)
        let size = UnsafeRawPointer(out).load(as: Int.self)
        guard size == MemoryLayout<T>.size else {
            throw ArgumentError(
                "\(name)->size is \(size) but this library's \(type) has \(MemoryLayout<T>.size) bytes: set "
                    + "\(name)->size = sizeof(\(type))")
        }
        return out
    }

    /// A versioned struct (`size` first): the pointer checked, its `size` equal to this library's struct and
    /// `version` of the library's major and at most its minor. `initMacro` names the macro that fills it.
    /// `older`: a struct that grew since an older minor version, with that version's size and the first version
    /// that added fields. A struct of that size and an older version is read as far as it goes; the fields added
    /// since are zero (NULL), as the older header's callers never set them.
    static func versionedStruct<T>(
        _ pointer: UnsafePointer<T>?, _ name: String, initMacro: String, version: (T) -> UInt32,
        older: (size: Int, grewIn: UInt32)? = nil
    ) throws(ArgumentError) -> T {
        let p = try Self.pointer(pointer, name)
        let size = UnsafeRawPointer(p).load(as: Int.self)
        let expected = MemoryLayout<T>.size
        let value: T
        if size == expected {
            value = p.pointee
        } else if let older, size == older.size, older.size < expected {
            // Only `size` bytes are the caller's: copy them over a zeroed struct.
            let bytes = UnsafeMutableRawPointer.allocate(byteCount: expected, alignment: MemoryLayout<T>.alignment)
            defer { bytes.deallocate() }
            bytes.initializeMemory(as: UInt8.self, repeating: 0, count: expected)
            bytes.copyMemory(from: UnsafeRawPointer(p), byteCount: size)
            value = bytes.load(as: T.self)
            guard version(value) < older.grewIn else {
                throw ArgumentError(
                    "\(name)->size is \(size), the size of an older flashmoe.h's struct, but \(name)->version is "
                        + "\(version(value)): initialise it with \(initMacro) from the flashmoe.h of version \(LibraryVersion.text)")
            }
        } else {
            let newer = size > expected ? " (a newer flashmoe.h than this library)" : ""
            throw ArgumentError(
                "\(name)->size is \(size) but this library's struct has \(expected) bytes\(newer): initialise it with "
                    + "\(initMacro) from the flashmoe.h of version \(LibraryVersion.text)")
        }
        let v = version(value)
        let library = UInt32(LibraryVersion.number)
        // A struct from an older minor version of the header is accepted (its size matched); a newer one is not.
        guard v / 10000 == library / 10000, v / 100 <= library / 100 else {
            throw ArgumentError(
                "\(name)->version is \(v) but this library is \(LibraryVersion.number) (\(LibraryVersion.text)): "
                    + "build against a flashmoe.h of the same major and an equal or older minor version, and "
                    + "initialise the struct with \(initMacro)")
        }
        return value
    }

    /// `value` as a Bool when it is 0 or 1.
    static func flag(_ value: Int32, _ name: String) throws(ArgumentError) -> Bool {
        guard value == 0 || value == 1 else { throw ArgumentError("\(name) must be 0 or 1, got \(value)") }
        return value == 1
    }

    /// `value` when it is at least `minimum`.
    static func atLeast(_ value: Int32, _ minimum: Int32, _ name: String, _ meaning: String) throws(ArgumentError)
        -> Int
    {
        guard value >= minimum else {
            throw ArgumentError("\(name) (\(meaning)) must be at least \(minimum), got \(value)")
        }
        return Int(value)
    }

    /// The case of `cases` whose raw value is `value`; the message lists the accepted names.
    static func enumeration<E>(_ value: Int32, _ name: String, _ cases: [(Int32, String, E)]) throws(ArgumentError)
        -> E
    {
        if let match = cases.first(where: { $0.0 == value }) { return match.2 }
        let accepted = cases.map { "\($0.1) (\($0.0))" }.joined(separator: ", ")
        throw ArgumentError("\(name) is \(value), which is not one of \(accepted)")
    }

    /// The product of `factors`, or an error naming `what` when it does not fit in memory at all.
    static func product(_ factors: [Int], _ what: String) throws(ArgumentError) -> Int {
        var total = 1
        for f in factors {
            let (p, overflow) = total.multipliedReportingOverflow(by: f)
            guard !overflow, p <= Int.max / 16 else {
                throw ArgumentError("\(what) \(factors) is too large to address: lower the config's shape fields")
            }
            total = p
        }
        return total
    }
}

/// The library's version, as FLASHMOE_VERSION encodes it.
enum LibraryVersion {
    static let number = Int(FLASHMOE_VERSION_MAJOR) * 10000 + Int(FLASHMOE_VERSION_MINOR) * 100
        + Int(FLASHMOE_VERSION_PATCH)
    static let text = "\(FLASHMOE_VERSION_MAJOR).\(FLASHMOE_VERSION_MINOR).\(FLASHMOE_VERSION_PATCH)"
}
