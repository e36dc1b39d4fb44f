/// A shape, configuration or input mistake. The message always says what to change.
public struct MoEError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of mistake it is, for callers that branch on it.
    public enum Kind: String, Sendable, Hashable {
        case invalidConfig
        case shapeMismatch
        case invalidInput
        case unknownPreset
        case unsupported
    }

    /// What kind of mistake it is.
    public let kind: Kind
    /// What is wrong and what to change.
    public let message: String

    /// An error of `kind` saying `message`.
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    /// `message` alone (it already says what to change).
    public var description: String { message }
}
