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

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}
