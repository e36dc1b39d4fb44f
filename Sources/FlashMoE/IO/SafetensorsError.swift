/// A safetensors file or tensor that cannot be read, written or converted. The message says what is wrong and
/// where (file, tensor, byte offsets).
public struct SafetensorsError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of problem it is, for callers and tests that branch on it.
    public enum Kind: String, Sendable, Hashable {
        /// Opening, reading or writing the file failed.
        case io
        /// The file is shorter than the 8-byte header length.
        case truncatedFile
        /// The header length is larger than the format's limit.
        case headerTooLarge
        /// The header length runs past the end of the file.
        case truncatedHeader
        /// The header is not valid UTF-8 JSON.
        case invalidJSON
        /// The header is JSON but not an object of tensor entries (or `__metadata__` is not a string map).
        case invalidHeader
        /// A tensor entry lacks a field or has one of the wrong type.
        case invalidEntry
        /// A tensor's `dtype` is not a known safetensors type.
        case unknownDType
        /// A tensor's shape is not a list of non-negative integers, or its size overflows.
        case invalidShape
        /// A tensor's `data_offsets` are reversed or lie past the data.
        case invalidOffsets
        /// A tensor's byte span does not match shape × element size.
        case sizeMismatch
        /// Two tensors share bytes.
        case overlap
        /// Two entries have the same name.
        case duplicateName
        /// No tensor has the requested name.
        case tensorNotFound
        /// The tensor's dtype does not convert to what was asked for.
        case dtypeMismatch
        /// A sharded checkpoint's index file is malformed.
        case invalidIndex
    }

    /// The category of the problem.
    public let kind: Kind
    /// What is wrong and what to change.
    public let message: String

    /// An error of `kind` with a message for the user.
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    init(_ failure: FileFailure) {
        self.init(.io, failure.description)
    }

    /// `message` alone (it already says what is wrong and what to change).
    public var description: String { message }
}
